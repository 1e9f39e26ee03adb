//! Aligned plain-text tables for `magnetar admin`: a header row and columns separated by two
//! spaces, numbers right-aligned. No borders and no colours, so the output pastes and greps well.

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table being filled row by row.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers, every column left-aligned.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            align: vec![Align::Left; header.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns the columns at these indexes (for numbers).
    pub fn right(mut self, columns: &[usize]) -> Self {
        for &c in columns {
            if let Some(a) = self.align.get_mut(c) {
                *a = Align::Right;
            }
        }
        self
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as lines ending in `\n`, without trailing spaces.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - width(cell));
                match self.align[i] {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `KEY  value` lines with the keys padded to one width (a record, not a list).
pub fn record(pairs: &[(&str, String)]) -> String {
    let key_width = pairs.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{k:<key_width$}  {v}").trim_end().to_string() + "\n").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_numbers_align_right() {
        let mut t = Table::new(&["NAME", "BACKLOG", "NOTE"]).right(&[1]);
        t.row(vec!["audit".into(), "10".into(), "x".into()]);
        t.row(vec!["a".into(), "1234".into()]);
        assert_eq!(t.render(), "NAME   BACKLOG  NOTE\naudit       10  x\na         1234\n");
    }

    #[test]
    fn an_empty_table_is_its_header_and_records_pad_keys() {
        assert_eq!(Table::new(&["TENANT"]).render(), "TENANT\n");
        assert_eq!(record(&[("topic", "t".into()), ("ledgers", "2".into())]), "topic    t\nledgers  2\n");
    }
}
