//! Build facts: the release and the commit cpha was built from (build.rs sets `CPHA_COMMIT`;
//! `unknown` without git). A leaf: the command line and the metrics both read it.

/// The release and the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CPHA_COMMIT"), ")");

/// The commit alone, for `cpha_build_info`.
pub const COMMIT: &str = env!("CPHA_COMMIT");
