//! Lists: one engine for every `ls` (and `ps`, `hosts`, `processes`): paging through the API's
//! `pagination.next` up to `--limit`, field selectors mapped onto the API's collection filters,
//! label selectors, `-o table|wide|json|yaml`, and `--watch` that follows the event stream.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use drover_client::{Client, Subscribe};
use serde_json::{Value, json};

use crate::output::{self, Format, OutputArgs, Table};

/// The flags every list takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ListOptions {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Label selector: `key=value`, `key!=value` or `key` (has the label); repeat to AND them.
    /// The API has no label filter, so the CLI applies it to the pages it reads.
    #[arg(short = 'l', long = "selector", value_name = "LABEL")]
    pub labels: Vec<String>,
    /// Field selector, sent as the API's collection filter: `state=running`, `state!=stopped`,
    /// `name=web`, `hostId=1h1` (the filters `/v1/schemas` lists); repeat to AND them.
    #[arg(long = "field-selector", visible_alias = "field", value_name = "FIELD")]
    pub fields: Vec<String>,
    /// Show at most this many rows, reading as many pages as that takes (0: all); says so on
    /// stderr when there are more.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub limit: usize,
    /// How many rows each request asks for (1 to 1000): a list reads pages of this size
    /// through the API's `pagination.next` links.
    #[arg(long, default_value_t = 500, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub chunk_size: u16,
    /// After the list, keep printing each change of a listed (or newly matching) row, live
    /// from the event stream, until Ctrl-C.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

/// A column: its header, whether only `-o wide` shows it, and how a row shows it.
pub struct Column {
    pub header: &'static str,
    pub wide: bool,
    pub value: Box<dyn Fn(&Value) -> String + Send + Sync>,
}

impl std::fmt::Debug for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.header)
    }
}

/// A column that shows a field.
pub fn field(header: &'static str, name: &'static str) -> Column {
    Column {
        header,
        wide: false,
        value: Box::new(move |row| text(row, name)),
    }
}

/// A column that shows a computed value.
pub fn computed(
    header: &'static str,
    value: impl Fn(&Value) -> String + Send + Sync + 'static,
) -> Column {
    Column {
        header,
        wide: false,
        value: Box::new(value),
    }
}

/// The column, shown with `-o wide` only.
pub fn wide(mut column: Column) -> Column {
    column.wide = true;
    column
}

/// How `--watch` learns of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// `resource.change` events of this API type carry the row itself.
    Changes(&'static str),
    /// Read the first page again after these events (debounced) and print what changed.
    Refetch(&'static [&'static str]),
    /// Nothing tells of changes.
    Unsupported,
}

/// What a list reads and shows.
#[derive(Debug)]
pub struct ListSpec {
    /// The collection path under `/v1`.
    pub path: String,
    /// Filters always sent (e.g. `state_ne=removed`).
    pub query: Vec<(String, String)>,
    /// Whether the endpoint takes collection filters and paging (else field selectors are
    /// applied by the CLI).
    pub server_filters: bool,
    pub columns: Vec<Column>,
    pub watch: Watch,
    /// The fields that identify a row's version for [`Watch::Refetch`].
    pub key: fn(&Value) -> String,
}

/// A field as text (`null` as empty, arrays space-separated).
pub fn text(value: &Value, field: &str) -> String {
    plain(&value[field])
}

/// A JSON value as text.
pub fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(" "),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| format!("{key}={}", plain(value)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// A field selector, parsed.
#[derive(Debug, Clone)]
struct FieldSelector {
    name: String,
    equal: bool,
    value: String,
}

fn field_selectors(items: &[String]) -> anyhow::Result<Vec<FieldSelector>> {
    items
        .iter()
        .flat_map(|item| item.split(','))
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (name, equal, value) = if let Some((name, value)) = item.split_once("!=") {
                (name, false, value)
            } else if let Some((name, value)) = item.split_once("==") {
                (name, true, value)
            } else if let Some((name, value)) = item.split_once('=') {
                (name, true, value)
            } else {
                anyhow::bail!(
                    "field selector {item:?} is not FIELD=VALUE or FIELD!=VALUE (e.g. state=running)"
                );
            };
            Ok(FieldSelector {
                name: name.trim().to_owned(),
                equal,
                value: value.trim().to_owned(),
            })
        })
        .collect()
}

impl FieldSelector {
    fn query(&self) -> (String, String) {
        let key = if self.equal {
            self.name.clone()
        } else {
            format!("{}_ne", self.name)
        };
        (key, self.value.clone())
    }

    fn matches(&self, row: &Value) -> bool {
        (text(row, &self.name) == self.value) == self.equal
    }
}

/// A label selector, parsed.
#[derive(Debug, Clone)]
struct LabelSelector {
    key: String,
    /// `None`: the label exists; `Some((true, v))`: equals v; `Some((false, v))`: differs.
    value: Option<(bool, String)>,
}

fn label_selectors(items: &[String]) -> anyhow::Result<Vec<LabelSelector>> {
    items
        .iter()
        .flat_map(|item| item.split(','))
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (key, value) = if let Some((key, value)) = item.split_once("!=") {
                (key, Some((false, value.trim().to_owned())))
            } else if let Some((key, value)) = item.split_once('=') {
                (key, Some((true, value.trim().to_owned())))
            } else {
                (item, None)
            };
            let key = key.trim();
            if key.is_empty() {
                anyhow::bail!("label selector {item:?} names no label (e.g. -l tier=web)");
            }
            Ok(LabelSelector {
                key: key.to_owned(),
                value,
            })
        })
        .collect()
}

impl LabelSelector {
    fn matches(&self, row: &Value) -> bool {
        // A service's labels are in its launch config.
        let labels = if row["labels"].is_object() {
            &row["labels"]
        } else {
            &row["launchConfig"]["labels"]
        };
        let label = labels.get(&self.key).map(plain);
        match (&self.value, label) {
            (None, label) => label.is_some(),
            (Some((true, value)), Some(label)) => &label == value,
            (Some((true, _)), None) => false,
            (Some((false, value)), label) => label.as_ref() != Some(value),
        }
    }
}

/// A parsed list request.
struct Selection {
    fields: Vec<FieldSelector>,
    labels: Vec<LabelSelector>,
}

impl Selection {
    fn matches(&self, row: &Value, with_fields: bool) -> bool {
        self.labels.iter().all(|label| label.matches(row))
            && (!with_fields || self.fields.iter().all(|field| field.matches(row)))
    }
}

/// The path of the first page.
fn first_page(spec: &ListSpec, selection: &Selection, limit: usize, chunk: usize) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in &spec.query {
        query.append_pair(key, value);
    }
    if spec.server_filters {
        for field in &selection.fields {
            let (key, value) = field.query();
            query.append_pair(&key, &value);
        }
        // No larger pages than the rows asked for.
        let page = match limit {
            0 => chunk,
            limit => limit.min(chunk),
        };
        query.append_pair("limit", &page.to_string());
    }
    let query = query.finish();
    if query.is_empty() {
        spec.path.clone()
    } else if spec.path.contains('?') {
        format!("{}&{query}", spec.path)
    } else {
        format!("{}?{query}", spec.path)
    }
}

/// Reads pages until `limit` rows match (0: all); returns the rows, whether there are more,
/// and the first page (for its other fields).
async fn read(
    client: &Client,
    spec: &ListSpec,
    selection: &Selection,
    limit: usize,
    chunk: usize,
) -> anyhow::Result<(Vec<Value>, bool, Value)> {
    let mut rows = Vec::new();
    let mut link = Some(first_page(spec, selection, limit, chunk));
    let mut first: Option<Value> = None;
    let mut more = false;
    while let Some(path) = link.take() {
        let page = client.get(&path).await?;
        let data = page["data"].as_array().cloned().unwrap_or_default();
        let mut taken = 0;
        for row in data.iter() {
            if limit != 0 && rows.len() >= limit {
                break;
            }
            taken += 1;
            if selection.matches(row, !spec.server_filters) {
                rows.push(row.clone());
            }
        }
        let next = page["pagination"]["next"]
            .as_str()
            .filter(|next| !next.is_empty())
            .map(str::to_owned);
        if limit != 0 && rows.len() >= limit {
            more = taken < data.len() || next.is_some();
        } else {
            link = next;
        }
        if first.is_none() {
            first = Some(page);
        }
    }
    Ok((rows, more, first.unwrap_or(Value::Null)))
}

fn columns(spec: &ListSpec, format: Format) -> Vec<&Column> {
    spec.columns
        .iter()
        .filter(|column| format == Format::Wide || !column.wide)
        .collect()
}

fn cells(columns: &[&Column], row: &Value) -> Vec<String> {
    columns.iter().map(|column| (column.value)(row)).collect()
}

fn max_cell(format: Format) -> usize {
    if format == Format::Wide {
        output::WIDE_CELL
    } else {
        output::TABLE_CELL
    }
}

/// Lists, prints, and with `--watch` follows.
pub async fn list(client: &Client, spec: ListSpec, options: &ListOptions) -> anyhow::Result<()> {
    let selection = Selection {
        fields: field_selectors(&options.fields)?,
        labels: label_selectors(&options.labels)?,
    };
    let format = options.output.format();
    // Subscribed before the list is read, so no change after the list is missed.
    let mut stream = if options.watch {
        let names: Vec<&str> = match spec.watch {
            Watch::Changes(_) => vec!["resource.change"],
            Watch::Refetch(names) => names.to_vec(),
            Watch::Unsupported => {
                anyhow::bail!(
                    "--watch: no event tells of changes here; run the command again to see them"
                )
            }
        };
        Some(client.subscribe(Subscribe::names(names)).await?)
    } else {
        None
    };
    let chunk = usize::from(options.chunk_size);
    let (rows, more, first) = read(client, &spec, &selection, options.limit, chunk).await?;
    let columns = columns(&spec, format);
    let max = max_cell(format);
    let mut widths = Vec::new();
    match format {
        Format::Json | Format::Yaml => {
            let mut body = if first.is_object() {
                first
            } else {
                json!({"type": "collection"})
            };
            body["data"] = Value::Array(rows.clone());
            body["pagination"] = json!({"limit": options.limit, "partial": more, "next": null});
            if stream.is_some() && format == Format::Json {
                // One line per document, as the changes that follow.
                output::print(&body)?;
            } else {
                output::document(&body, format)?;
            }
        }
        Format::Table | Format::Wide => {
            let mut table = Table::new(&columns.iter().map(|c| c.header).collect::<Vec<_>>(), max);
            for row in &rows {
                table.row(cells(&columns, row));
            }
            widths = table.print()?;
        }
    }
    if more {
        eprintln!(
            "(showing the first {} rows; there are more: pass --limit N for more, --limit 0 for all)",
            options.limit
        );
    }
    let Some(stream) = stream.as_mut() else {
        return Ok(());
    };
    let print_row = |row: &Value| -> anyhow::Result<()> {
        match format {
            Format::Json => output::print(row),
            Format::Yaml => output::print(format!("---\n{}", output::yaml(row)?.trim_end())),
            _ => Table::print_row(&cells(&columns, row), &widths, max),
        }
    };
    match spec.watch {
        Watch::Changes(api_type) => {
            // The rows shown: a change that takes one out of the selection is shown too.
            let mut shown: HashSet<String> = rows.iter().map(|row| text(row, "id")).collect();
            loop {
                let event = tokio::select! {
                    event = stream.next_event() => event?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(event) = event else {
                    anyhow::bail!("the server closed the event stream");
                };
                if drover_proto::names::base(event.name()) != "resource.change"
                    || event.resource_type.as_deref() != Some(api_type)
                {
                    continue;
                }
                let Some(row) = event.data.as_ref().map(|data| &data["resource"]) else {
                    continue;
                };
                let id = text(row, "id");
                let matches = selection.matches(row, true)
                    && spec
                        .query
                        .iter()
                        .all(|(key, value)| query_matches(row, key, value));
                if matches || shown.contains(&id) {
                    print_row(row)?;
                    if shown.len() < 100_000 {
                        shown.insert(id);
                    }
                }
            }
        }
        Watch::Refetch(_) => {
            let mut seen: HashMap<String, String> = rows
                .iter()
                .map(|row| (text(row, "id"), (spec.key)(row)))
                .collect();
            let page = options.limit.clamp(1, 1000);
            loop {
                let event = tokio::select! {
                    event = stream.next_event() => event?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(event) = event else {
                    anyhow::bail!("the server closed the event stream");
                };
                if event.name() == "ping" {
                    continue;
                }
                // Debounced: read again once the burst is over (or at most every second).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                loop {
                    let quiet = tokio::time::sleep(Duration::from_millis(200));
                    tokio::select! {
                        _ = quiet => break,
                        _ = tokio::time::sleep_until(deadline) => break,
                        event = stream.next_event() => {
                            if event?.is_none() {
                                anyhow::bail!("the server closed the event stream");
                            }
                        }
                    }
                }
                let (rows, _, _) = read(client, &spec, &selection, page, chunk).await?;
                let mut now = HashMap::with_capacity(rows.len());
                for row in &rows {
                    let id = text(row, "id");
                    let key = (spec.key)(row);
                    if seen.get(&id) != Some(&key) {
                        print_row(row)?;
                    }
                    now.insert(id, key);
                }
                seen = now;
            }
        }
        Watch::Unsupported => Ok(()),
    }
}

/// Whether a row passes one of the filters a list always sends (`state_ne=removed`).
fn query_matches(row: &Value, key: &str, value: &str) -> bool {
    match key.strip_suffix("_ne") {
        Some(name) => text(row, name) != value,
        None if key == "limit" => true,
        None => row.get(key).is_none() || text(row, key) == value,
    }
}

/// The filters that hide removed resources.
pub fn live() -> Vec<(String, String)> {
    ["removed", "purging", "purged"]
        .iter()
        .map(|state| ("state_ne".to_owned(), (*state).to_owned()))
        .collect()
}

/// A row's version: its id and state.
pub fn state_key(row: &Value) -> String {
    format!("{} {}", text(row, "state"), text(row, "transitioning"))
}
