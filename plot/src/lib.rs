//! plotters glue shared by `kiln bench --plot` and `kiln-train`'s training curves.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Fonts tried when none is given (Debian/Ubuntu's fonts-dejavu-core first).
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// plotters renders text with a TrueType font registered at run time, as "sans-serif";
/// the first one registered stays for the process.
pub fn register_font(explicit: Option<&Path>) -> Result<(), String> {
    static REGISTERED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let candidates: Vec<PathBuf> = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
        };
        let path = candidates
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| "no TrueType font found; install fonts-dejavu-core or pass --font FILE.ttf".to_string())?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", path.display()))?;
        Ok(path)
    });
    result.as_ref().map(|_| ()).map_err(Clone::clone)
}

/// Something that draws itself on any plotters backend.
pub trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Whether `path` names a format [`render`] writes (`.svg` or `.png`), checked before any work.
pub fn check_format(path: &Path) -> Result<(), String> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg" | "png") => Ok(()),
        _ => Err(format!("{}: a plot must be a .svg or .png file", path.display())),
    }
}

/// Registers a font, creates the parent directory and renders `figure` to `path` as SVG
/// or PNG, by extension.
pub fn render(figure: &impl Figure, path: &Path, size: (u32, u32), font: Option<&Path>) -> Result<(), String> {
    check_format(path)?;
    register_font(font)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => figure.draw(SVGBackend::new(path, size).into_drawing_area()),
        Some("png") => figure.draw(BitMapBackend::new(path, size).into_drawing_area()),
        _ => Err(format!("{}: a plot must be a .svg or .png file", path.display())),
    }
}
