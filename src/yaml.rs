//! YAML reading and writing for the whole crate.
//!
//! NOTE: this is the only module that names `serde_yaml`. That crate is deprecated upstream; keeping
//! every use behind these two functions and [`YamlError`] means a replacement touches one file.
//! Nothing of `serde_yaml` leaks through the public API.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A YAML document could not be read or written.
///
/// The message is the parser's own text with every character outside printable ASCII escaped, so
/// the error can go into a log line even when the input was hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    message: String,
    location: Option<Location>,
}

/// Where in the input a [`YamlError`] was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column number.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}", self.line, self.column)
    }
}

impl YamlError {
    /// Position of the problem in the input, when the parser knows it.
    pub fn location(&self) -> Option<Location> {
        self.location
    }

    /// 1-based line of the problem, when known.
    pub fn line(&self) -> Option<usize> {
        self.location.map(|l| l.line)
    }

    /// 1-based column of the problem, when known.
    pub fn column(&self) -> Option<usize> {
        self.location.map(|l| l.column)
    }

    fn from_backend(err: serde_yaml::Error) -> Self {
        let location = err.location().map(|l| Location { line: l.line(), column: l.column() });
        YamlError { message: crate::logging::printable(&err.to_string()), location }
    }
}

/// Reads one YAML document into `T`.
pub fn from_str<T: DeserializeOwned>(s: &str) -> Result<T, YamlError> {
    serde_yaml::from_str(s).map_err(YamlError::from_backend)
}

/// Writes `v` as one YAML document (ending in a newline).
pub fn to_string<T: Serialize>(v: &T) -> Result<String, YamlError> {
    serde_yaml::to_string(v).map_err(YamlError::from_backend)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        ports: Vec<u16>,
        labels: BTreeMap<String, String>,
    }

    #[test]
    fn round_trips_a_struct() {
        let sample = Sample {
            name: "cp-1".into(),
            ports: vec![6443, 9445],
            labels: BTreeMap::from([("role".into(), "control-plane".into())]),
        };
        let text = to_string(&sample).unwrap();
        assert_eq!(from_str::<Sample>(&text).unwrap(), sample);
    }

    #[test]
    fn reads_a_list_of_strings() {
        let v: Vec<String> = from_str("- 10.0.0.11\n- \"[fd00::11]:6443\"\n").unwrap();
        assert_eq!(v, ["10.0.0.11", "[fd00::11]:6443"]);
    }

    #[test]
    fn syntax_error_carries_line_and_column() {
        let err = from_str::<Vec<String>>("- a\n- b\n  - : [\n").unwrap_err();
        let loc = err.location().expect("syntax errors have a location");
        assert_eq!(loc.line, 3, "{err}");
        assert!(loc.column >= 1, "{err}");
        assert_eq!(err.line(), Some(3));
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn type_error_carries_location() {
        let err = from_str::<Vec<u16>>("- 1\n- two\n").unwrap_err();
        assert_eq!(err.line(), Some(2), "{err}");
    }

    #[test]
    fn error_without_location() {
        let err = from_str::<Vec<String>>("- a\n---\n- b\n").unwrap_err();
        assert!(err.to_string().contains("more than one document"), "{err}");
    }

    #[test]
    fn error_message_cannot_carry_a_raw_newline() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        enum Kind {
            A,
        }
        // An unknown enum variant is echoed by serde inside backticks, unescaped.
        let err = from_str::<Kind>("\"B\\nlevel=error forged\"").unwrap_err();
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text:?}");
        assert!(text.contains("B\\nlevel=error forged"), "{text:?}");
    }

    #[test]
    fn escape_for_log_escapes_everything_but_printable_ascii() {
        assert_eq!(crate::logging::printable("a b\n\u{0}\u{202e}é"), "a b\\n\\u{0}\\u{202e}\\u{e9}");
    }

    #[test]
    fn alias_bombs_are_refused() {
        // Nine levels of ten-fold aliases would expand to 10^9 strings.
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = from_str::<BTreeMap<String, serde_json::Value>>(&doc).unwrap_err();
        assert!(err.to_string().contains("repetition limit"), "{err}");
    }
}
