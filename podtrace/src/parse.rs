//! What users type, parsed with a clear message: addresses, durations (as tcpdump users
//! write them), protocols. clap's value parsers for every command (and the agent's).
use std::net::Ipv4Addr;

/// Parses `--dst` with a clear message.
pub fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))
}

/// Parses a duration as tcpdump users write it: `90` (seconds), `90s`, `10m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use 90, 90s, 10m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?} is not a duration (use 90, 90s, 10m, 1h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?}: a duration must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
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
