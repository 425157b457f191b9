//! Plots written by the CLI (PNG and SVG, no system fonts: DejaVu Sans is embedded and registered once).

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The only failure is a malformed font, which the embedded DejaVu is not; text would then be missing.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn e<E: std::fmt::Display>(x: E) -> anyhow::Error {
    anyhow!("{x}")
}

/// One line of a line plot.
pub struct Line {
    /// Legend label.
    pub label: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// What to draw.
enum Figure<'a> {
    Scatter { title: &'a str, real: &'a [f64], est: &'a [f64] },
    Lines { title: &'a str, x_desc: &'a str, y_desc: &'a str, series: &'a [Line] },
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, fig: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(e)?;
    match fig {
        Figure::Scatter { title, real, est } => {
            let hi = real.iter().chain(est.iter()).copied().fold(0.0f64, f64::max) * 1.05 + 1e-9;
            let lo = real.iter().chain(est.iter()).copied().fold(f64::INFINITY, f64::min).min(hi) * 0.95;
            let mut chart = ChartBuilder::on(&root)
                .caption(*title, ("sans-serif", 22))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(55)
                .build_cartesian_2d(lo..hi, lo..hi)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("measured (ms)")
                .y_desc("estimated (ms)")
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(e)?;
            chart.draw_series(LineSeries::new([(lo, lo), (hi, hi)], BLACK.stroke_width(1))).map_err(e)?;
            chart
                .draw_series(real.iter().zip(est.iter()).map(|(&x, &y)| Circle::new((x, y), 3, BLUE.mix(0.5).filled())))
                .map_err(e)?;
        }
        Figure::Lines { title, x_desc, y_desc, series } => {
            let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
            for &(x, y) in series.iter().flat_map(|s| s.points.iter()) {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
            if !x0.is_finite() {
                (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
            }
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
            let (y0, y1) = (y0.min(0.0), y1 + ((y1 - y0) * 0.05).max(1e-9));
            let mut chart = ChartBuilder::on(&root)
                .caption(*title, ("sans-serif", 22))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(65)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(e)?;
            chart.configure_mesh().x_desc(*x_desc).y_desc(*y_desc).label_style(("sans-serif", 14)).draw().map_err(e)?;
            for (i, s) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                    .map_err(e)?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(e)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

fn write_both(stem: &Path, fig: &Figure) -> Result<Vec<String>> {
    register_font();
    if let Some(dir) = stem.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw(BitMapBackend::new(&png, (900, 650)).into_drawing_area(), fig)
        .with_context(|| format!("cannot write {}", png.display()))?;
    draw(SVGBackend::new(&svg, (900, 650)).into_drawing_area(), fig)
        .with_context(|| format!("cannot write {}", svg.display()))?;
    Ok(vec![png.display().to_string(), svg.display().to_string()])
}

/// A scatter plot of estimates against measurements with the y = x line, as `<stem>.png` and `<stem>.svg`.
pub fn scatter_estimate_vs_real(stem: &Path, title: &str, real: &[f64], est: &[f64]) -> Result<Vec<String>> {
    write_both(stem, &Figure::Scatter { title, real, est })
}

/// A line plot of several series, as `<stem>.png` and `<stem>.svg`.
pub fn lines(stem: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Line]) -> Result<Vec<String>> {
    write_both(stem, &Figure::Lines { title, x_desc, y_desc, series })
}
