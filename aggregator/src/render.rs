//! Query results as text for people and spreadsheets: the JSON the query API answers
//! (`{"columns":[{"name"}],"rows":[[...]],"truncated"}`) as a psql-like aligned table or as CSV.
//! Used by the `query` command, the fleet commands' tables and the demo.
//!
//! Pure: it takes a JSON value and returns a string; it sends, reads and prints nothing.

fn columns_and_rows(body: &serde_json::Value) -> (Vec<String>, Vec<Vec<String>>) {
    let columns = body["columns"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| c["name"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    let rows = body["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    row.as_array()
                        .map(|cells| cells.iter().map(cell_text).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    (columns, rows)
}

fn cell_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// psql-like aligned table with a row count.
pub fn render_table(body: &serde_json::Value) -> String {
    let (columns, rows) = columns_and_rows(body);
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in &rows {
        for (idx, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(idx) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!(" {cell:<width$} "))
            .collect::<Vec<_>>()
            .join("|")
            .trim_end()
            .to_owned()
    };
    let mut out = String::new();
    out.push_str(&line(&columns));
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+"),
    );
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    let n = rows.len();
    out.push_str(&format!("({n} row{})", if n == 1 { "" } else { "s" }));
    if body["truncated"].as_bool() == Some(true) {
        out.push_str(", truncated at query.max_result_rows");
    }
    out
}

/// RFC 4180 CSV with a header line.
pub fn render_csv(body: &serde_json::Value) -> String {
    let (columns, rows) = columns_and_rows(body);
    let field = |s: &String| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.clone()
        }
    };
    let mut out = columns.iter().map(field).collect::<Vec<_>>().join(",");
    for row in rows {
        out.push('\n');
        out.push_str(&row.iter().map(field).collect::<Vec<_>>().join(","));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_csv_rendering() {
        let body = serde_json::json!({
            "columns": [{"name": "name"}, {"name": "n"}],
            "rows": [["page_view", 3], ["a,\"b\"", null]],
            "truncated": false
        });
        assert_eq!(
            render_table(&body),
            " name      | n\n-----------+---\n page_view | 3\n a,\"b\"     |\n(2 rows)"
        );
        assert_eq!(render_csv(&body), "name,n\npage_view,3\n\"a,\"\"b\"\"\",");
    }
}
