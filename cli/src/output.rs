//! Plain-text tables and durations for people; JSON is written with `serde_json` directly.

use std::fmt::Write as _;
use std::time::Duration;

/// Renders `rows` under `header` as left-aligned columns, numbers right-aligned.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let pad = widths[i];
            let _ = if numeric[i] {
                write!(text, "{cell:>pad$}  ")
            } else {
                write!(text, "{cell:<pad$}  ")
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `850ms`, `12s`, `3m 20s`, `2days 4h`: whole seconds from a second on, two units at most.
pub(crate) fn age(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        return format!("{}ms", duration.as_millis());
    }
    let text = humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string();
    text.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

/// `text` cut to `max` characters, with an ellipsis when cut, on one line.
pub(crate) fn cut(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let rows = vec![
            vec!["emails".to_owned(), "12".to_owned()],
            vec!["sms".to_owned(), "3".to_owned()],
        ];
        assert_eq!(
            table(&["QUEUE", "READY"], &rows),
            "QUEUE   READY\nemails     12\nsms         3\n"
        );
    }

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(Duration::from_millis(850)), "850ms");
        assert_eq!(age(Duration::from_millis(12_400)), "12s");
        assert_eq!(age(Duration::from_secs(200)), "3m 20s");
        assert_eq!(
            age(Duration::from_secs(2 * 86_400 + 4 * 3600 + 5)),
            "2days 4h"
        );
    }

    #[test]
    fn long_text_is_cut_on_one_line() {
        assert_eq!(cut("a\nb", 10), "a b");
        assert_eq!(cut("abcdefghij", 5), "abcd…");
    }
}
