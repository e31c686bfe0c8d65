//! Duration flags such as `50ms`, `2s`, `1.5s`, `10m`, `1h` (a bare number means seconds).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration parsed from a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Dur> for Duration {
    fn from(d: Dur) -> Duration {
        d.0
    }
}

/// Longest accepted duration: every lab run is bounded, a week is far beyond any of them.
const MAX_SECS: f64 = 7.0 * 24.0 * 3600.0;

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!("{s:?}: expected a number with a unit (ms, s, m, h)"));
        }
        let value: f64 = num.parse().map_err(|_| format!("{s:?}: {num:?} is not a number"))?;
        let scale = match unit {
            "ms" => 0.001,
            "" | "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h)")),
        };
        let secs = value * scale;
        if !secs.is_finite() || secs > MAX_SECS {
            return Err(format!("{s:?}: longer than a week"));
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Duration {
        s.parse::<Dur>().unwrap().0
    }

    #[test]
    fn parses_units() {
        assert_eq!(d("50ms"), Duration::from_millis(50));
        assert_eq!(d("2s"), Duration::from_secs(2));
        assert_eq!(d("2"), Duration::from_secs(2));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("10m"), Duration::from_secs(600));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d(" 3s "), Duration::from_secs(3));
    }

    #[test]
    fn rejects_garbage() {
        let number = "expected a number with a unit";
        for (bad, reason) in [
            ("", number),
            ("s", number),
            ("ms", number),
            ("-1s", number),
            ("five", number),
            ("1x", "unknown unit"),
            ("1e3s", "unknown unit"),
            ("1.2.3s", "is not a number"),
            ("9999h", "longer than a week"),
        ] {
            let err = bad.parse::<Dur>().expect_err(bad);
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn displays_round_trip() {
        for s in ["50ms", "2s", "600s", "1500ms"] {
            assert_eq!(s.parse::<Dur>().unwrap().to_string(), s);
        }
    }
}
