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

/// What to draw.
enum Figure<'a> {
    Scatter { title: &'a str, real: &'a [f64], est: &'a [f64] },
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
