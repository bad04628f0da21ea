//! `--plot file.svg|png`: latency percentiles against throughput, one point per level.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{LoadError, Report};

const SIZE: (u32, u32) = (960, 600);

/// Draws the report's levels to `path`; the format follows the extension.
pub fn plot(report: &Report, path: &Path, font: Option<&Path>) -> Result<(), LoadError> {
    kiln_plot::check_format(path).map_err(LoadError::InvalidArgument)?;
    kiln_plot::render(&LatencyFigure(report), path, SIZE, font).map_err(LoadError::Plot)
}

struct LatencyFigure<'a>(&'a Report);

impl kiln_plot::Figure for LatencyFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), String> {
        draw(root, self.0).map_err(|e| match e {
            LoadError::Plot(m) => m,
            other => other.to_string(),
        })
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, report: &Report) -> Result<(), LoadError> {
    let err = |e: &dyn std::fmt::Display| LoadError::Plot(e.to_string());
    let levels: Vec<_> = report.levels.iter().filter(|l| l.requests > 0).collect();
    if levels.is_empty() {
        return Err(LoadError::Plot("no level completed a request".into()));
    }
    type Pick = fn(&super::Latency) -> f64;
    let series: [(&str, Pick, RGBColor); 4] = [
        ("p50", |l| l.p50_ms, RGBColor(31, 119, 180)),
        ("p90", |l| l.p90_ms, RGBColor(44, 160, 44)),
        ("p99", |l| l.p99_ms, RGBColor(255, 127, 14)),
        ("p99.9", |l| l.p999_ms, RGBColor(214, 39, 40)),
    ];
    let floor = 0.001;
    let ys = levels.iter().flat_map(|l| series.iter().map(move |s| (s.1)(&l.latency).max(floor)));
    let (y_min, y_max) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let y_max = y_max.max(report.latency_target_ms.unwrap_or(0.0));
    let x_max = levels.iter().map(|l| l.throughput_rps).fold(0.0, f64::max).max(1.0) * 1.05;

    root.fill(&WHITE).map_err(|e| err(&e))?;
    let caption = format!("kiln bench: latency vs throughput ({} loop, HTTP/{})", report.mode, report.http);
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, (y_min * 0.8..y_max * 1.25).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("throughput (requests/s)")
        .y_desc("latency (ms)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (name, pick, color) in series {
        let points: Vec<(f64, f64)> = levels.iter().map(|l| (l.throughput_rps, pick(&l.latency).max(floor))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
    }
    if let Some(t) = report.latency_target_ms {
        let line = vec![(0.0, t), (x_max, t)];
        chart
            .draw_series(DashedLineSeries::new(line, 6, 4, BLACK.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label(format!("target {t} ms ({})", report.metric))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
