//! Durations as the config writes them: `"500ms"`, `"2s"`, `"1m30s"`, `"30d"`.

use std::time::Duration;

/// The longest duration any setting takes: a year. Longer ones are typos, and deadlines
/// made from them (`now + timeout`) would overflow the clock.
pub const MAX: Duration = Duration::from_secs(365 * 86_400);

/// Parses a sequence of `<integer><unit>` terms; units are `ms`, `s`, `m`, `h`, `d`.
/// A bare `"0"` is accepted as zero; any other number needs a unit. At most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty duration; write e.g. \"500ms\", \"2s\", \"30d\"".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("invalid duration {text:?}: expected a number at {rest:?}"));
        }
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let n: u64 = number.parse().map_err(|_| format!("invalid duration {text:?}: number too large"))?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!("invalid duration {text:?}: {n} needs a unit (ms, s, m, h, d)"));
            }
            other => {
                return Err(format!("invalid duration {text:?}: unknown unit {other:?} (ms, s, m, h, d)"));
            }
        };
        let too_large = || format!("invalid duration {text:?}: more than a year (365d)");
        let ms = n.checked_mul(millis_per_unit).ok_or_else(too_large)?;
        total = total.checked_add(Duration::from_millis(ms)).filter(|t| *t <= MAX).ok_or_else(too_large)?;
        rest = tail;
    }
    Ok(total)
}

/// A duration as the config writes it (`"1m30s"`, `"500ms"`, `"0"`): what [`parse`] takes
/// back, to the millisecond.
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0".into();
    }
    let mut out = String::new();
    for (unit, per) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= per {
            out += &format!("{}{unit}", ms / per);
            ms %= per;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sequences() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn formats_as_the_config_writes() {
        for (d, text) in [
            (Duration::ZERO, "0"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_millis(1500), "1s500ms"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(30 * 86_400), "30d"),
            (MAX, "365d"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(parse(text), Ok(d));
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "5", "s", "2 s", "2x", "1.5s", "-1s", "99999999999999999999s"] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_year_at_most() {
        assert_eq!(parse("365d"), Ok(MAX));
        assert_eq!(parse("364d23h59m59s999ms"), Ok(MAX - Duration::from_millis(1)));
        // Each term alone fits a u64 of milliseconds; their sum once overflowed (a panic).
        let many = "18446744073709551615ms".repeat(1000);
        for bad in ["366d", "365d1ms", "8761h", many.as_str()] {
            let e = parse(bad);
            assert!(e.as_ref().is_err_and(|e| e.contains("more than a year")), "{bad}: {e:?}");
        }
    }
}
