//! The one way cpha reads durations and sizes written by people, on the command line and in
//! YAML alike: `30s`, `500ms`, `2m`, `1h 30m` (humantime's grammar), and `1048576`, `512K`, `1M`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses a duration such as `30s`, `500ms`, `2m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s, 500ms or 2m: {e}"))
}

/// `#[serde(deserialize_with = "crate::units::duration")]`: a duration written as text.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// `#[serde(deserialize_with = "crate::units::optional_duration")]`: absent or `null` is `None`.
pub fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    text.map(|t| parse_duration(&t).map_err(serde::de::Error::custom)).transpose()
}

/// `1048576`, `1024K` or `1M`; at most 64 MiB, which no LAN round trip needs.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1 << 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1 << 20),
            None => (s, 1),
        },
    };
    let n: usize =
        digits.parse().map_err(|_| format!("{s:?} is not a size: use bytes, or a number followed by K or M"))?;
    match n.checked_mul(unit) {
        Some(bytes) if bytes <= 64 << 20 => Ok(bytes),
        _ => Err(format!("{s} is more than 64M")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").unwrap_err().contains("not a duration"));
        #[derive(serde::Deserialize)]
        struct S {
            #[serde(deserialize_with = "duration")]
            d: Duration,
            #[serde(default, deserialize_with = "optional_duration")]
            o: Option<Duration>,
        }
        let s: S = crate::yaml::from_str("d: 250ms\n").unwrap();
        assert_eq!((s.d, s.o), (Duration::from_millis(250), None));
        let s: S = crate::yaml::from_str("d: 1s\no: 2m\n").unwrap();
        assert_eq!(s.o, Some(Duration::from_secs(120)));
        let err = crate::yaml::from_str::<S>("d: fast\n").err().unwrap().to_string();
        assert!(err.contains("not a duration"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("65M").unwrap_err().contains("more than 64M"));
        assert!(parse_size("-1").unwrap_err().contains("not a size"));
        assert!(parse_size("18446744073709551615K").unwrap_err().contains("more than 64M"));
    }
}
