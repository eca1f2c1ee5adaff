//! drover's web UI as static assets: plain HTML, CSS and JavaScript modules under `assets/`,
//! with no build step, so `cargo build` needs no Node.js.
//!
//! Release builds embed the files in the binary; debug builds read them from `assets/` on each
//! request (rust-embed's default), so an edit shows on reload without recompiling.
//! The server (`drover-server`, feature `web-ui`) serves them at `/` and `/assets/…`.

use std::borrow::Cow;

#[derive(rust_embed::RustEmbed)]
#[folder = "assets/"]
struct Files;

/// One asset, ready to serve.
#[derive(Debug, Clone)]
pub struct Asset {
    /// The file's bytes.
    pub bytes: Cow<'static, [u8]>,
    /// Its content type, from its extension.
    pub content_type: String,
    /// A strong validator for `ETag`: the hex SHA-256 of the bytes.
    pub etag: String,
}

/// The page every UI route answers with.
pub const INDEX: &str = "index.html";

/// The asset at `path` (relative to `assets/`, no leading slash), if there is one.
pub fn get(path: &str) -> Option<Asset> {
    let file = Files::get(path)?;
    let hash = file.metadata.sha256_hash();
    let mut etag = String::with_capacity(2 + 2 * hash.len());
    etag.push('"');
    for byte in hash {
        etag.push_str(&format!("{byte:02x}"));
    }
    etag.push('"');
    Some(Asset {
        content_type: file.metadata.mimetype().to_owned(),
        bytes: file.data,
        etag,
    })
}

/// Every asset's path, for tests and diagnostics.
pub fn paths() -> impl Iterator<Item = Cow<'static, str>> {
    Files::iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_modules_are_there_with_their_types() {
        let index = get(INDEX).expect("index.html");
        assert!(index.content_type.starts_with("text/html"));
        assert!(String::from_utf8_lossy(&index.bytes).contains("/assets/js/main.js"));
        let main = get("js/main.js").expect("js/main.js");
        assert!(
            main.content_type.contains("javascript"),
            "{}",
            main.content_type
        );
        assert!(get("app.css").unwrap().content_type.starts_with("text/css"));
        assert_ne!(index.etag, main.etag);
        assert!(get("nope.js").is_none());
    }

    #[test]
    fn every_module_import_names_an_asset() {
        // A typo in an import path breaks the whole UI at run time; catch it here.
        for path in paths().filter(|path| path.ends_with(".js")) {
            let text = String::from_utf8(get(&path).unwrap().bytes.into_owned()).unwrap();
            for line in text.lines() {
                let line = line.trim();
                if !(line.starts_with("import ") || line.starts_with("} from ")) {
                    continue;
                }
                let Some(spec) = line.split(['\'', '"']).nth(1) else {
                    continue;
                };
                let dir = path.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("");
                let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
                for part in spec.split('/') {
                    match part {
                        "." => {}
                        ".." => {
                            parts.pop();
                        }
                        other => parts.push(other),
                    }
                }
                let target = parts.join("/");
                assert!(get(&target).is_some(), "{path} imports {spec}: no {target}");
            }
        }
    }
}
