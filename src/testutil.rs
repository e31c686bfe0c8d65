//! Helpers for the crate's unit tests.

/// Compares `actual` with `tests/golden/NAME`; `CPHA_UPDATE_GOLDEN=1` rewrites the file instead.
pub fn golden(name: &str, actual: &str) {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("CPHA_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (set CPHA_UPDATE_GOLDEN=1)"));
    pretty_assertions::assert_eq!(expected, actual, "golden file {name}");
}
