//! What a run reports as it goes: a progress bar, `metrics.jsonl` (one JSON object per
//! logged step and per epoch, appended, so a resumed run continues the same file) and
//! `curves.svg` (training loss per step, evaluation loss and accuracy per epoch).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::train::EpochMetrics;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum Record {
    Step { epoch: u64, step: u64, loss: f64, lr: f64 },
    Epoch(EpochMetrics),
}

/// Rank 0's view of the run's outputs.
#[derive(Debug)]
pub struct RunLog {
    dir: PathBuf,
    jsonl: File,
    bar: Option<ProgressBar>,
    progress: bool,
    /// (step, loss) of every logged step, this run and earlier ones.
    losses: Vec<(u64, f64)>,
}

impl RunLog {
    pub fn open(dir: &Path, progress: bool) -> Result<Self, TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let mut losses = Vec::new();
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines().map_while(Result::ok) {
                if let Ok(Record::Step { step, loss, .. }) = serde_json::from_str(&line) {
                    losses.push((step, loss));
                }
            }
        }
        let jsonl = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| TrainError::io(&path, e))?;
        Ok(RunLog { dir: dir.to_path_buf(), jsonl, bar: None, progress, losses })
    }

    pub fn start_epoch(&mut self, epoch: u64, steps: u64, done: u64) {
        if !self.progress {
            return;
        }
        let bar = ProgressBar::new(steps);
        if let Ok(style) =
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(epoch.to_string());
        bar.set_position(done);
        self.bar = Some(bar);
    }

    pub fn tick(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    pub fn step(&mut self, epoch: u64, step: u64, loss: f64, lr: f64) -> Result<(), TrainError> {
        self.losses.retain(|(s, _)| *s < step);
        self.losses.push((step, loss));
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        }
        self.write(&Record::Step { epoch, step, loss, lr })
    }

    pub fn epoch(&mut self, m: &EpochMetrics, history: &[EpochMetrics]) -> Result<(), TrainError> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        tracing::info!(
            "epoch {} (step {}): train loss {:.4} acc {:.2}% | eval loss {:.4} acc {:.2}% | {:.0} examples/s",
            m.epoch,
            m.step,
            m.train_loss,
            m.train_accuracy * 100.0,
            m.eval_loss,
            m.eval_accuracy * 100.0,
            m.examples_per_second
        );
        self.write(&Record::Epoch(m.clone()))?;
        let curves = Curves { losses: &self.losses, history };
        // A missing font must not stop training; the numbers are in metrics.jsonl.
        if let Err(e) = kiln_plot::render(&curves, &self.dir.join("curves.svg"), (1100, 450), None) {
            tracing::warn!("curves.svg not drawn: {e}");
        }
        Ok(())
    }

    fn write(&mut self, record: &Record) -> Result<(), TrainError> {
        let path = self.dir.join("metrics.jsonl");
        let line = serde_json::to_string(record).map_err(|e| TrainError::Data(e.to_string()))?;
        writeln!(self.jsonl, "{line}").map_err(|e| TrainError::io(&path, e))
    }
}

struct Curves<'a> {
    losses: &'a [(u64, f64)],
    history: &'a [EpochMetrics],
}

impl kiln_plot::Figure for Curves<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (left, right) = root.split_horizontally(550);
        let last_step = self.losses.last().map(|l| l.0).unwrap_or(1).max(1) as f64;
        let max_loss = self
            .losses
            .iter()
            .map(|l| l.1)
            .chain(self.history.iter().flat_map(|h| [h.train_loss, h.eval_loss]))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-3);
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        let mut chart = ChartBuilder::on(&left)
            .caption("loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..last_step, 0.0..max_loss * 1.05)
            .map_err(|x| e(&x))?;
        chart.configure_mesh().x_desc("step").draw().map_err(|x| e(&x))?;
        let train: Vec<(f64, f64)> = self.losses.iter().map(|(s, l)| (*s as f64, *l)).collect();
        chart
            .draw_series(LineSeries::new(train, blue.stroke_width(1)))
            .map_err(|x| e(&x))?
            .label("train (logged steps)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], blue));
        let eval: Vec<(f64, f64)> = self.history.iter().map(|h| (h.step as f64, h.eval_loss)).collect();
        chart
            .draw_series(LineSeries::new(eval.clone(), orange.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label("eval (per epoch)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], orange));
        chart.draw_series(eval.into_iter().map(|p| Circle::new(p, 3, orange.filled()))).map_err(|x| e(&x))?;
        chart.configure_series_labels().border_style(BLACK).draw().map_err(|x| e(&x))?;

        let epochs = self.history.len().max(1) as f64;
        let mut acc = ChartBuilder::on(&right)
            .caption("accuracy (%)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.5..epochs + 0.5, 0.0..100.0)
            .map_err(|x| e(&x))?;
        acc.configure_mesh().x_desc("epoch").draw().map_err(|x| e(&x))?;
        for (name, color, pick) in [
            ("train", blue, (|h: &EpochMetrics| h.train_accuracy) as fn(&EpochMetrics) -> f64),
            ("eval", orange, |h: &EpochMetrics| h.eval_accuracy),
        ] {
            let pts: Vec<(f64, f64)> =
                self.history.iter().enumerate().map(|(i, h)| (i as f64 + 1.0, pick(h) * 100.0)).collect();
            acc.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            acc.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|x| e(&x))?;
        }
        acc.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))
    }
}
