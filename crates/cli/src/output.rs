//! How commands print: `-o table|wide|json|yaml` (`--json` is `-o json`), tables whose cells
//! are cut to a width with `…` and never carry a raw control character, and a stdout whose
//! reader went away (`drover ps | head`) ending the command quietly instead of a panic.

use std::fmt;
use std::io::Write;

use serde_json::Value;
use unicode_width::UnicodeWidthStr;

/// The output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Columns for a terminal, long cells cut with `…`.
    Table,
    /// More columns, cells cut later.
    Wide,
    /// The API's JSON (one document; `--watch`: one line per change).
    Json,
    /// The API's JSON as YAML (`--watch`: one `---` document per change).
    Yaml,
}

/// `-o`/`--json`, flattened into every command.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Print JSON (the same as `-o json`).
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    /// The format asked for.
    pub fn format(&self) -> Format {
        if self.json { Format::Json } else { self.output }
    }

    /// Whether the output is for a program (JSON or YAML) rather than a person.
    pub fn structured(&self) -> bool {
        matches!(self.format(), Format::Json | Format::Yaml)
    }
}

/// Standard output was closed by its reader (`drover ps | head`): the command stops, quietly
/// and successfully.
#[derive(Debug)]
pub struct ClosedOutput;

impl fmt::Display for ClosedOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for ClosedOutput {}

/// Writes `text` and a newline to stdout, flushed (a `--watch` line shows at once).
pub fn print(text: impl fmt::Display) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(ClosedOutput))
        }
        Err(error) => Err(anyhow::anyhow!("cannot write to standard output: {error}")),
    }
}

/// Prints a value as JSON or YAML.
pub fn document(value: &Value, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Yaml => print(yaml(value)?.trim_end()),
        _ => print(value),
    }
}

/// A value as YAML.
pub fn yaml(value: &Value) -> anyhow::Result<String> {
    serde_saphyr::to_string(value).map_err(|error| anyhow::anyhow!("cannot write YAML: {error}"))
}

/// Widest a cell is in `table` output, and in `wide` output.
pub const TABLE_CELL: usize = 40;
/// Widest a cell is in `wide` output.
pub const WIDE_CELL: usize = 120;

/// A value made safe for one terminal cell: control characters shown escaped (`\n`, `\t`,
/// `\u{1b}`), never raw, and the text cut to `max` columns with `…`.
pub fn cell(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max.saturating_mul(4)));
    let mut width = 0;
    // Where the text stands when one column is left for `…`.
    let mut cut: Option<usize> = None;
    for ch in text.chars() {
        let piece: String = if ch.is_control() {
            ch.escape_default().collect()
        } else {
            ch.to_string()
        };
        let piece_width = UnicodeWidthStr::width(piece.as_str());
        if cut.is_none() && width + piece_width > max.saturating_sub(1) {
            cut = Some(out.len());
        }
        if width + piece_width > max {
            out.truncate(cut.unwrap_or(0));
            out.push('…');
            return out;
        }
        width += piece_width;
        out.push_str(&piece);
    }
    out
}

/// A table: a header and rows of cells, printed with columns aligned.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    max: usize,
}

impl Table {
    /// A table whose cells are cut to `max` columns.
    pub fn new(header: &[&str], max: usize) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            max,
        }
    }

    /// Adds a row (cut and escaped).
    pub fn row(&mut self, row: Vec<String>) {
        self.rows
            .push(row.iter().map(|text| cell(text, self.max)).collect());
    }

    /// The column widths.
    pub fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.width()).collect();
        for row in &self.rows {
            for (index, text) in row.iter().enumerate() {
                if let Some(width) = widths.get_mut(index) {
                    *width = (*width).max(text.width());
                }
            }
        }
        widths
    }

    /// Prints the header and the rows; returns the widths for rows printed later (`--watch`).
    pub fn print(&self) -> anyhow::Result<Vec<usize>> {
        let widths = self.widths();
        print(line(&self.header, &widths))?;
        for row in &self.rows {
            print(line(row, &widths))?;
        }
        Ok(widths)
    }

    /// Prints one more row, cut and escaped, aligned to `widths`.
    pub fn print_row(row: &[String], widths: &[usize], max: usize) -> anyhow::Result<()> {
        let cells: Vec<String> = row.iter().map(|text| cell(text, max)).collect();
        print(line(&cells, widths))
    }
}

/// Cells padded to their column's width, three spaces apart, no trailing blanks.
fn line(cells: &[String], widths: &[usize]) -> String {
    let mut out = String::new();
    for (index, text) in cells.iter().enumerate() {
        if index > 0 {
            out.push_str("   ");
        }
        out.push_str(text);
        let width = widths.get(index).copied().unwrap_or(0);
        for _ in text.width()..width {
            out.push(' ');
        }
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_cut_and_escaped() {
        assert_eq!(cell("short", 10), "short");
        assert_eq!(cell("exactly-10", 10), "exactly-10");
        assert_eq!(cell("exactly-11!", 10), "exactly-1…");
        assert_eq!(cell("a\nb\tc\u{1b}[31m", 40), "a\\nb\\tc\\u{1b}[31m");
        let long = "x".repeat(100_000);
        let cut = cell(&long, 40);
        assert_eq!(cut.chars().count(), 40);
        assert!(cut.ends_with('…'));
        assert!(!cell("bell\u{7}", 40).contains('\u{7}'));
    }

    #[test]
    fn lines_align_and_trim() {
        let widths = [4, 6];
        assert_eq!(line(&["ab".into(), "c".into()], &widths), "ab     c");
    }
}
