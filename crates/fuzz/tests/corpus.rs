//! Replays the checked-in corpus of every target: the seeds, and every input a fuzzer found
//! (kept as regressions). `.ci/fuzz` runs the same targets under libFuzzer.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let data = std::fs::read(&path).expect("a corpus file");
            (path, data)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    files
}

/// Runs every input of a target's corpus; each must hold the target's properties, and each must
/// be used (decoded, parsed, sent) unless its name starts with `invalid-`.
fn replay(target: &str, run: impl Fn(&[u8]) -> bool) {
    let mut failed = Vec::new();
    for (path, data) in corpus(target) {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data))) {
            Ok(true) => {}
            Ok(false) if !name_of(&path).starts_with("invalid-") => {
                failed.push(format!("{} is not used by the target", path.display()))
            }
            Ok(false) => {}
            Err(_) => failed.push(format!("{} fails", path.display())),
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn event_corpus() {
    replay("event", drover_fuzz::event);
}

#[test]
fn names_corpus() {
    replay("names", drover_fuzz::names);
}

#[test]
fn query_corpus() {
    replay("query", drover_fuzz::query);
}

#[test]
fn api_corpus() {
    let api = drover_fuzz::api::Api::start();
    replay("api", |data| api.run(data));
}
