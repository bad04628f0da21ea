//! A small RFC 4180 reader for delimited text files.
//!
//! Fields may be quoted with `"`; inside quotes the delimiter and line breaks are literal and `""` is one
//! quote. A quote anywhere but at the start of a field is an ordinary character (so unquoted TSV text with
//! quotes in it still reads as written). Records end at `\n` or `\r\n`; blank lines are skipped.

/// One record and the 1-based line it starts on.
pub(crate) type Record = (usize, Vec<String>);

/// Splits `text` into records of fields.
pub(crate) fn parse(text: &str, delimiter: char) -> Result<Vec<Record>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut line = 1;
    let mut record_line = 1;
    let mut chars = text.chars().peekable();
    // Whether the current field has content or was quoted: only an unstarted field can open a quote, and a
    // record whose only field never started is a blank line.
    let mut started = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if !started => {
                let open_line = line;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            field.push(ch);
                        }
                        None => return Err(format!("line {open_line}: a quoted field is never closed")),
                    }
                }
                started = true;
                match chars.peek() {
                    None | Some('\n' | '\r') => {}
                    Some(&next) if next == delimiter => {}
                    Some(&next) => {
                        return Err(format!(
                            "line {line}: unexpected {next:?} after a closing quote (quotes inside a quoted field are written \"\")"
                        ));
                    }
                }
            }
            c if c == delimiter => {
                fields.push(std::mem::take(&mut field));
                started = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                end_record(&mut records, &mut fields, &mut field, started, record_line);
                started = false;
                line += 1;
                record_line = line;
            }
            c => {
                field.push(c);
                started = true;
            }
        }
    }
    end_record(&mut records, &mut fields, &mut field, started, record_line);
    Ok(records)
}

fn end_record(records: &mut Vec<Record>, fields: &mut Vec<String>, field: &mut String, started: bool, line: usize) {
    if fields.is_empty() && !started && field.is_empty() {
        return; // a blank line
    }
    fields.push(std::mem::take(field));
    records.push((line, std::mem::take(fields)));
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn fields(text: &str, d: char) -> Vec<Vec<String>> {
        parse(text, d).unwrap_or_else(|e| panic!("{e}")).into_iter().map(|(_, f)| f).collect()
    }

    #[test]
    fn rfc4180() {
        assert_eq!(fields("a,b\r\n\r\n\"x,\"\"y\"\"\",\n", ','), [vec!["a", "b"], vec!["x,\"y\"", ""]]);
        assert_eq!(fields("\u{feff}\"multi\nline\"\tz\nlast\tq", '\t'), [vec!["multi\nline", "z"], vec!["last", "q"]]);
        assert_eq!(fields("it's a \"quote\",1\n\"\",2\n", ','), [vec!["it's a \"quote\"", "1"], vec!["", "2"]]);
        let lines: Vec<usize> =
            parse("a,1\n\"b\nc\",2\n\nd,3\n", ',').unwrap_or_default().iter().map(|r| r.0).collect();
        assert_eq!(lines, [1, 2, 5]);
        assert!(parse("\"open,1\n", ',').is_err());
        assert!(parse("\"x\"y,1\n", ',').is_err());
    }
}
