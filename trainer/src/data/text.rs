//! Text classification from a CSV or TSV file, tokenised once at load.

use std::path::Path;

use tokenizers::{PostProcessor, Tokenizer, TruncationParams};

use super::{Batch, Dataset, check_indices, csv, dim, tensor_i64};
use crate::error::TrainError;

/// How [`TextClassification`] reads its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextOptions {
    /// Longest token sequence kept, special tokens included; longer texts are truncated.
    pub max_len: usize,
    /// Field separator; `None`: tab for `.tsv`, comma for `.csv`.
    pub delimiter: Option<char>,
    /// Whether the first record is a header to skip.
    pub has_header: bool,
    /// 0-based column of the label.
    pub label_column: usize,
    /// 0-based column of the text.
    pub text_column: usize,
}

impl Default for TextOptions {
    /// Rows `text,label` without a header, at most 128 tokens.
    fn default() -> Self {
        TextOptions { max_len: 128, delimiter: None, has_header: false, label_column: 1, text_column: 0 }
    }
}

/// Labelled texts, held as token ids.
///
/// Labels that are all non-negative integers are used as class ids (class names `"0"`, `"1"`, … up to the
/// largest); otherwise the distinct label strings, sorted, are the classes. Batches are
/// `[input_ids, attention_mask, token_type_ids]`, int64 `[B, S]`, right-padded to the longest sequence of
/// the batch. There is no augmentation: `augment` is ignored.
#[derive(Debug, Clone)]
pub struct TextClassification {
    ids: Vec<Vec<u32>>,
    type_ids: Vec<Vec<u32>>,
    labels: Vec<i64>,
    classes: Vec<String>,
    pad_id: i64,
}

impl TextClassification {
    /// Reads `path`, maps its labels, and tokenises every text with the `tokenizer.json` at `tokenizer`.
    pub fn load(path: &Path, tokenizer: &Path, options: TextOptions) -> Result<Self, TrainError> {
        let delimiter = match options.delimiter {
            Some(d) => d,
            None => match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
                Some("tsv") => '\t',
                Some("csv") => ',',
                _ => {
                    return Err(TrainError::Config(format!(
                        "{}: cannot tell the delimiter from the extension (expected .csv or .tsv); set it",
                        path.display()
                    )));
                }
            },
        };
        if matches!(delimiter, '"' | '\n' | '\r') {
            return Err(TrainError::Config(format!("{delimiter:?} cannot be a delimiter")));
        }
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| TrainError::Data(format!("{}: not UTF-8 text ({e})", path.display())))?;
        let records = csv::parse(&text, delimiter).map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
        let rows = &records[usize::from(options.has_header).min(records.len())..];
        let needed = options.text_column.max(options.label_column) + 1;
        let mut texts = Vec::with_capacity(rows.len());
        let mut raw_labels = Vec::with_capacity(rows.len());
        for (line, fields) in rows {
            if fields.len() < needed {
                return Err(TrainError::Data(format!(
                    "{} line {line}: {} field(s), but the text and label columns need {needed}",
                    path.display(),
                    fields.len()
                )));
            }
            texts.push(fields[options.text_column].as_str());
            let label = fields[options.label_column].trim();
            if label.is_empty() {
                return Err(TrainError::Data(format!("{} line {line}: empty label", path.display())));
            }
            raw_labels.push(label);
        }
        if texts.is_empty() {
            return Err(TrainError::Data(format!("{}: no examples", path.display())));
        }
        let (labels, classes) = map_labels(&raw_labels);
        let (tokenizer, pad_id) = prepare_tokenizer(tokenizer, options.max_len)?;
        let encodings = tokenizer
            .encode_batch(texts, true)
            .map_err(|e| TrainError::Tokenizer(format!("{}: {e}", path.display())))?;
        let (ids, type_ids) = encodings.iter().map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec())).unzip();
        Ok(TextClassification { ids, type_ids, labels, classes, pad_id })
    }

    /// Example `i`'s token ids (special tokens included, unpadded) and class id. Panics if `i` is out of
    /// range, like slice indexing.
    pub fn example(&self, i: usize) -> (&[u32], i64) {
        (&self.ids[i], self.labels[i])
    }

    /// All class ids, in example order.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// The id that pads `input_ids`.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Keeps only the first `n` examples (all of them if there are fewer); the classes stay.
    pub fn limit(mut self, n: usize) -> Self {
        self.ids.truncate(n);
        self.type_ids.truncate(n);
        self.labels.truncate(n);
        self
    }

    /// A copy holding only these examples, in this order; the classes stay.
    pub fn subset(&self, indices: &[usize]) -> Result<Self, TrainError> {
        check_indices(indices, self.len())?;
        Ok(TextClassification {
            ids: indices.iter().map(|&i| self.ids[i].clone()).collect(),
            type_ids: indices.iter().map(|&i| self.type_ids[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
            pad_id: self.pad_id,
        })
    }
}

impl Dataset for TextClassification {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn batch(&self, indices: &[usize], _augment: Option<u64>) -> Result<Batch, TrainError> {
        check_indices(indices, self.len())?;
        let seq = indices.iter().map(|&i| self.ids[i].len()).max().unwrap_or(0);
        let n = indices.len() * seq;
        let (mut input_ids, mut mask, mut type_ids) = (vec![self.pad_id; n], vec![0i64; n], vec![0i64; n]);
        for (row, &i) in indices.iter().enumerate() {
            let at = row * seq;
            for (k, (&id, &ty)) in self.ids[i].iter().zip(&self.type_ids[i]).enumerate() {
                input_ids[at + k] = i64::from(id);
                mask[at + k] = 1;
                type_ids[at + k] = i64::from(ty);
            }
        }
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i]).collect();
        let shape = [dim(indices.len())?, dim(seq)?];
        Ok(Batch {
            inputs: vec![tensor_i64(&input_ids, &shape)?, tensor_i64(&mask, &shape)?, tensor_i64(&type_ids, &shape)?],
            labels: tensor_i64(&labels, &[shape[0]])?,
        })
    }
}

/// Class ids and names for the raw label strings.
fn map_labels(raw: &[&str]) -> (Vec<i64>, Vec<String>) {
    // Integer labels keep their meaning (e.g. SST-2's 0/1), even when some class is absent from this file.
    let numeric: Option<Vec<i64>> = raw.iter().map(|l| l.parse::<u32>().ok().map(i64::from)).collect();
    if let Some(ids) = numeric {
        let max = ids.iter().copied().max().unwrap_or(0);
        return (ids, (0..=max).map(|i| i.to_string()).collect());
    }
    let mut classes: Vec<String> = raw.iter().map(|l| l.to_string()).collect();
    classes.sort();
    classes.dedup();
    let ids = raw.iter().map(|l| classes.binary_search_by(|c| c.as_str().cmp(l)).map_or(0, |i| i as i64)).collect();
    (ids, classes)
}

/// Loads the tokenizer with truncation to `max_len` and padding off (batches pad themselves), and finds
/// the pad id: the tokenizer's padding configuration, else its `[PAD]` token, else 0.
fn prepare_tokenizer(path: &Path, max_len: usize) -> Result<(Tokenizer, i64), TrainError> {
    let mut tokenizer =
        Tokenizer::from_file(path).map_err(|e| TrainError::Tokenizer(format!("{}: {e}", path.display())))?;
    let pad_id = tokenizer.get_padding().map(|p| p.pad_id).or_else(|| tokenizer.token_to_id("[PAD]")).unwrap_or(0);
    let special = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
    if max_len <= special {
        return Err(TrainError::Config(format!(
            "max_len {max_len} leaves no room for text after the tokenizer's {special} special tokens"
        )));
    }
    tokenizer.with_padding(None);
    let truncation = TruncationParams { max_length: max_len, ..TruncationParams::default() };
    tokenizer
        .with_truncation(Some(truncation))
        .map_err(|e| TrainError::Tokenizer(format!("{}: {e}", path.display())))?;
    Ok((tokenizer, i64::from(pad_id)))
}
