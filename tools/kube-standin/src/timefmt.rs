//! Timestamps the way the API server reads and writes them (`metav1.Time`: RFC 3339, UTC, whole
//! seconds; `metav1.MicroTime`: six fractional digits) and the human "age" column kubectl
//! shows, without pulling in a calendar crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `2024-05-01T12:34:56Z` for a Unix time.
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, (secs / 60) % 60, secs % 60)
}

/// Parses the subset of RFC 3339 the API server emits (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || (b[10] != b'T' && b[10] != b't') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset)
}

/// `2024-05-01T12:34:56.123456Z` (`metav1.MicroTime`'s form) for a Unix time and microseconds.
pub fn rfc3339_micro(unix: i64, micros: u32) -> String {
    let s = rfc3339(unix);
    format!("{}.{micros:06}Z", &s[..s.len() - 1])
}

/// Go's `time.RFC3339`, what `metav1.Time` parses with.
pub const GO_RFC3339: &str = "2006-01-02T15:04:05Z07:00";
/// `metav1.RFC3339Micro`, what `metav1.MicroTime` parses with: exactly six fractional digits.
pub const GO_RFC3339_MICRO: &str = "2006-01-02T15:04:05.000000Z07:00";

/// Parses `s` as Go's `time.Parse` does with [`GO_RFC3339`] (`micro` false) or
/// [`GO_RFC3339_MICRO`] (`micro` true), returning Unix seconds and nanoseconds, or Go's
/// `*time.ParseError` text.
pub fn parse_go(s: &str, micro: bool) -> Result<(i64, u32), String> {
    let layout = if micro { GO_RFC3339_MICRO } else { GO_RFC3339 };
    let cannot =
        |rest: &str, elem: &str| format!("parsing time {s:?} as {layout:?}: cannot parse {rest:?} as {elem:?}");
    let range = |what: &str| format!("parsing time {s:?}: {what} out of range");
    // Fixed-width decimal field at the start of `rest`.
    fn digits(rest: &str, n: usize) -> Option<i64> {
        let d = rest.get(..n)?;
        d.bytes().all(|b| b.is_ascii_digit()).then(|| d.parse().ok()).flatten()
    }
    let mut rest = s;
    let num = |rest: &mut &str, n: usize, elem: &str| -> Result<i64, String> {
        let v = digits(rest, n).ok_or_else(|| cannot(rest, elem))?;
        *rest = &rest[n..];
        Ok(v)
    };
    let lit = |rest: &mut &str, l: &str| -> Result<(), String> {
        match rest.strip_prefix(l) {
            Some(r) => {
                *rest = r;
                Ok(())
            }
            None => Err(cannot(rest, l)),
        }
    };
    let year = num(&mut rest, 4, "2006")?;
    lit(&mut rest, "-")?;
    let month = num(&mut rest, 2, "01")?;
    if !(1..=12).contains(&month) {
        return Err(range("month"));
    }
    lit(&mut rest, "-")?;
    let day = num(&mut rest, 2, "02")?;
    lit(&mut rest, "T")?;
    // The hour is not fixed-width in Go's layout ("15"): one or two digits.
    let hour_len = rest.bytes().take(2).take_while(u8::is_ascii_digit).count();
    let hour = digits(rest, hour_len).filter(|_| hour_len > 0).ok_or_else(|| cannot(rest, "15"))?;
    rest = &rest[hour_len..];
    if hour > 23 {
        return Err(range("hour"));
    }
    lit(&mut rest, ":")?;
    let minute = num(&mut rest, 2, "04")?;
    if minute > 59 {
        return Err(range("minute"));
    }
    lit(&mut rest, ":")?;
    let second = num(&mut rest, 2, "05")?;
    if second > 59 {
        return Err(range("second"));
    }
    let mut nanos = 0u32;
    let fraction = |rest: &str| {
        rest.len() >= 2 && matches!(rest.as_bytes()[0], b'.' | b',') && rest.as_bytes()[1].is_ascii_digit()
    };
    if micro {
        let ok = rest.len() >= 7 && matches!(rest.as_bytes()[0], b'.' | b',') && digits(&rest[1..], 6).is_some();
        if !ok {
            return Err(cannot(rest, ".000000"));
        }
        nanos = digits(&rest[1..], 6).unwrap_or(0) as u32 * 1000;
        rest = &rest[7..];
    } else if fraction(rest) {
        let n = rest[1..].bytes().take_while(u8::is_ascii_digit).count();
        let frac = &rest[1..1 + n];
        let padded: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = padded.parse().unwrap_or(0);
        rest = &rest[1 + n..];
    }
    let offset = if let Some(r) = rest.strip_prefix('Z') {
        rest = r;
        0
    } else {
        let b = rest.as_bytes();
        let ok = b.len() >= 6 && matches!(b[0], b'+' | b'-') && b[3] == b':';
        let (h, m) = match (ok, digits(rest.get(1..).unwrap_or(""), 2), digits(rest.get(4..).unwrap_or(""), 2)) {
            (true, Some(h), Some(m)) => (h, m),
            _ => return Err(cannot(rest, "Z07:00")),
        };
        if h > 24 {
            return Err(range("time zone offset hour"));
        }
        if m > 60 {
            return Err(range("time zone offset minute"));
        }
        let sign = if b[0] == b'-' { -1 } else { 1 };
        rest = &rest[6..];
        sign * (h * 3600 + m * 60)
    };
    if !rest.is_empty() {
        return Err(format!("parsing time {s:?}: extra text: {rest:?}"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(range("day"));
    }
    Ok((days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset, nanos))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// kubectl's short duration (`translateTimestampSince` / `HumanDuration`): `45s`, `5m12s`, `3h`, `12d`, `2y10d`.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        let rem = s % 60;
        return if rem == 0 { format!("{m}m") } else { format!("{m}m{rem}s") };
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = s / 3600;
    if h < 8 {
        let rem = m % 60;
        return if rem == 0 { format!("{h}h") } else { format!("{h}h{rem}m") };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 24 * 8 {
        let rem = h % 24;
        return if rem == 0 { format!("{}d", h / 24) } else { format!("{}d{rem}h", h / 24) };
    }
    if h < 24 * 365 * 2 {
        return format!("{}d", h / 24);
    }
    if h < 24 * 365 * 8 {
        let dy = (h / 24) % 365;
        return if dy == 0 { format!("{}y", h / 24 / 365) } else { format!("{}y{dy}d", h / 24 / 365) };
    }
    format!("{}y", h / 24 / 365)
}

// Howard Hinnant's days/civil conversions.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_714_566_896), "2024-05-01T12:34:56Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        for t in [0, 1_714_566_896, 951_782_400, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2024-05-01T14:34:56.123+02:00"), Some(1_714_566_896));
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn go_layouts() {
        assert_eq!(parse_go("2024-05-01T12:34:56.123456Z", true), Ok((1_714_566_896, 123_456_000)));
        assert_eq!(parse_go("2024-05-01T14:34:56.123456+02:00", true), Ok((1_714_566_896, 123_456_000)));
        assert_eq!(rfc3339_micro(1_714_566_896, 123_456), "2024-05-01T12:34:56.123456Z");
        assert_eq!(
            parse_go("2024-05-01T12:34:56Z", true).unwrap_err(),
            r#"parsing time "2024-05-01T12:34:56Z" as "2006-01-02T15:04:05.000000Z07:00": cannot parse "Z" as ".000000""#
        );
        assert_eq!(
            parse_go("2024-05-01T12:34:56.123456789Z", true).unwrap_err(),
            r#"parsing time "2024-05-01T12:34:56.123456789Z" as "2006-01-02T15:04:05.000000Z07:00": cannot parse "789Z" as "Z07:00""#
        );
        assert_eq!(
            parse_go("bogus", false).unwrap_err(),
            r#"parsing time "bogus" as "2006-01-02T15:04:05Z07:00": cannot parse "bogus" as "2006""#
        );
        assert_eq!(parse_go("2024-05-01T12:34:56.5Z", false), Ok((1_714_566_896, 500_000_000)));
        assert_eq!(
            parse_go("2023-02-29T00:00:00Z", false).unwrap_err(),
            r#"parsing time "2023-02-29T00:00:00Z": day out of range"#
        );
        assert_eq!(
            parse_go("2024-13-01T00:00:00Z", false).unwrap_err(),
            r#"parsing time "2024-13-01T00:00:00Z": month out of range"#
        );
        assert_eq!(
            parse_go("2024-05-01T12:34:56Zjunk", false).unwrap_err(),
            r#"parsing time "2024-05-01T12:34:56Zjunk": extra text: "junk""#
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86_400 + 3600), "3d1h");
        assert_eq!(human_duration(30 * 86_400), "30d");
        assert_eq!(human_duration(3 * 365 * 86_400 + 86_400), "3y1d");
    }
}
