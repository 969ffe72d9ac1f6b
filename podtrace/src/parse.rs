//! What users type, parsed with a clear message: addresses, durations (as tcpdump users
//! write them), `-C` file sizes, protocols. Any text is safe to give: an error, never a panic
//! (property tests below). clap's value parsers for every command (and the agent's).
use std::net::Ipv4Addr;

/// Parses `--dst` with a clear message.
pub fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))
}

/// The longest DUR accepted: a year. Longer ones are surely a mistake, and would overflow
/// the clock arithmetic of a deadline.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

/// Parses a duration as tcpdump users write it: `90` (seconds), `90s`, `10m`, `1h`, `500ms`,
/// fractions too (`1.5s`). Positive and at most [`MAX_DURATION`]; any other text is an error
/// (never a panic).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let not_a_duration = || format!("{s:?} is not a duration (use 90, 90s, 10m, 1h)");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| not_a_duration())?;
    let nanos_per = match unit {
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "h" => 3600e9,
        _ => return Err(not_a_duration()),
    };
    // In nanoseconds, a whole number of any unit is exact (below 2^53 up to the limit).
    let nanos = (n * nanos_per).round();
    if !nanos.is_finite() || nanos > MAX_DURATION.as_nanos() as f64 {
        return Err(format!("{s:?}: a duration must be at most a year (8784h)"));
    }
    if nanos < 1.0 {
        return Err(format!("{s:?}: a duration must be positive"));
    }
    Ok(std::time::Duration::from_nanos(nanos as u64))
}

/// One million bytes, the unit of `-C` (as tcpdump's).
pub const MB: u64 = 1_000_000;

/// Parses `-C MB`: a whole, positive number of millions of bytes whose byte count fits in
/// 64 bits. Any other text is an error (never a panic).
pub fn parse_file_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "{s:?} is not a file size: give a whole number of millions of bytes (-C 100 is 100,000,000 bytes)"
        ));
    }
    let too_large = || {
        format!(
            "{s:?}: a file size of at most {} (million bytes)",
            u64::MAX / MB
        )
    };
    let n: u64 = t.parse().map_err(|_| too_large())?;
    if n == 0 {
        return Err("-C must be at least 1 (million bytes)".to_string());
    }
    n.checked_mul(MB).ok_or_else(too_large)?;
    Ok(n)
}

/// `--proto tcp|udp|icmp` → IP protocol number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    match s {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        _ => Err(format!("{s:?} is not one of tcp, udp, icmp")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("abc").is_err());
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration(" 2m ").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("8784h").unwrap(), MAX_DURATION);
        assert!(parse_duration("8785h").is_err());
    }

    /// These panicked (Duration::from_secs_f64 on a value past u64 seconds) or gave a zero
    /// duration that later code divides by or waits on.
    #[test]
    fn regression_durations_that_panicked() {
        for s in [
            "99999999999999999999",
            "99999999999999999999h",
            "18446744073709551616s",
            "1".repeat(400).as_str(),
            "0.0000000001",
            "0.0000000001ms",
            ".",
            "",
            "ms",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn file_sizes() {
        assert_eq!(parse_file_size("100").unwrap(), 100);
        assert_eq!(parse_file_size(" 1 ").unwrap(), 1);
        for bad in [
            "0",
            "",
            "-1",
            "+1",
            "1.5",
            "1e3",
            "10M",
            "１",
            "18446744073710",
        ] {
            assert!(parse_file_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_file_size("18446744073709").unwrap(), u64::MAX / MB);
    }

    mod props {
        use super::*;
        use crate::pcap::RotationPolicy;
        use proptest::prelude::*;

        proptest! {
            /// No text makes the parsers panic; whatever they accept is in range.
            #[test]
            fn any_text(s in "\\PC{0,24}", t in "[0-9.]{0,22}(ms|s|m|h|x|)") {
                for s in [s.as_str(), t.as_str()] {
                    if let Ok(d) = parse_duration(s) {
                        prop_assert!(!d.is_zero() && d <= MAX_DURATION, "{s:?} -> {d:?}");
                    }
                    if let Ok(n) = parse_file_size(s) {
                        prop_assert!(n >= 1 && n.checked_mul(MB).is_some());
                    }
                }
            }

            /// A whole number with a unit is that many units, up to the limit.
            #[test]
            fn whole_durations(n in 0u64..40_000_000, unit in 0usize..5) {
                let (suffix, nanos_per) = [("", 1_000_000_000u128), ("s", 1_000_000_000),
                    ("ms", 1_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000)][unit];
                let want = u128::from(n) * nanos_per;
                match parse_duration(&format!("{n}{suffix}")) {
                    Ok(d) => prop_assert_eq!(d.as_nanos(), want),
                    Err(_) => prop_assert!(n == 0 || want > MAX_DURATION.as_nanos()),
                }
            }

            /// Every size that fits is accepted, is the -C the rotation policy takes, and
            /// gives N million bytes per file; one more is refused.
            #[test]
            fn file_size_round_trip(n in 1u64..=u64::MAX / MB, pad in "[ ]{0,2}") {
                let got = parse_file_size(&format!("{pad}{n}{pad}"));
                prop_assert_eq!(got.clone(), Ok(n));
                let p = RotationPolicy::from_flags(Some(n), None, None).unwrap();
                prop_assert_eq!(p.max_file_bytes(), Some(n * MB));
            }

            #[test]
            fn file_sizes_past_u64_are_refused(extra in 1u64..1_000_000_000) {
                let n = u128::from(u64::MAX / MB) + u128::from(extra);
                prop_assert!(parse_file_size(&n.to_string()).is_err());
            }
        }
    }
}
