//! The paced UDP sender and the counting receiver of the lossless-rate sweep. They run inside
//! lab pods (`podtrace lab exec POD -- xtask bench udp-send|udp-recv ...`) and print one JSON
//! line with what they did.
use std::{
    io::Write as _,
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// Sends `size`-byte datagrams to `dst:port` at `rate` per second in all (0: as fast as they
/// can) for `seconds`, from `threads` sockets on as many threads, each a share of the rate;
/// each datagram carries its thread's sequence number in its first 8 bytes.
pub fn send(
    dst: Ipv4Addr,
    port: u16,
    rate: u64,
    seconds: f64,
    size: usize,
    threads: usize,
) -> Result<()> {
    let threads = threads.max(1) as u64;
    let shares: Vec<u64> = (0..threads)
        .map(|i| rate / threads + u64::from(i < rate % threads))
        .collect();
    let start = Instant::now();
    let results: Vec<Result<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .iter()
            .map(|&share| s.spawn(move || send_one(dst, port, share, rate == 0, seconds, size)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a sender panicked")))
            })
            .collect()
    });
    let (mut sent, mut errors) = (0u64, 0u64);
    for r in results {
        let (n, e) = r?;
        sent += n;
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"sent": sent, "seconds": secs, "errors": errors, "threads": threads})
    );
    Ok(())
}

/// One sender: `rate` datagrams per second (or flat out); (sent, errors).
fn send_one(
    dst: Ipv4Addr,
    port: u16,
    rate: u64,
    flat_out: bool,
    seconds: f64,
    size: usize,
) -> Result<(u64, u64)> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding the sender")?;
    sock.connect((dst, port))
        .with_context(|| format!("connecting to {dst}:{port}"))?;
    let mut buf = vec![0u8; size.max(8)];
    let count = if flat_out {
        u64::MAX
    } else {
        (rate as f64 * seconds).round() as u64
    };
    // A paced sender that falls behind keeps going a little past its time, then stops.
    let deadline = Duration::from_secs_f64(if flat_out {
        seconds
    } else {
        seconds * 1.05 + 0.05
    });
    let start = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    while sent < count {
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            break;
        }
        let due = if flat_out {
            sent + 64
        } else {
            ((elapsed.as_secs_f64() * rate as f64) as u64 + 1).min(count)
        };
        if sent >= due {
            // Ahead of schedule: sleep until the next datagram is due (bursts of about 100 µs).
            let next = Duration::from_secs_f64(sent as f64 / rate as f64);
            if next > elapsed {
                std::thread::sleep((next - elapsed).min(Duration::from_micros(100)));
            }
            continue;
        }
        // (A sender that fell behind sends its backlog in one go, checking the clock now and
        // then so that it still stops on time.)
        while sent < due && (sent % 64 != 0 || start.elapsed() < deadline) {
            buf[..8].copy_from_slice(&sent.to_be_bytes());
            match sock.send(&buf) {
                Ok(_) => sent += 1,
                Err(_) => {
                    // ENOBUFS and friends: count and retry the same datagram.
                    errors += 1;
                    if errors > 1_000_000 {
                        anyhow::bail!("sending keeps failing");
                    }
                }
            }
        }
    }
    Ok((sent, errors))
}

/// Counts datagrams arriving on `port`; ends when `expect` arrived (0: no target), or `idle`
/// seconds after the last one, or after `max` seconds.
pub fn recv(port: u16, expect: u64, idle: f64, max: f64) -> Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding UDP port {port}"))?;
    // A large receive buffer (root may exceed rmem_max), so a slow receiver loses less.
    let bytes: libc::c_int = 32 << 20;
    // SAFETY: setsockopt with a valid int option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    println!("{}", serde_json::json!({"listening": port}));
    std::io::stdout().flush()?;
    let start = Instant::now();
    let mut last = None::<Instant>;
    let mut received = 0u64;
    let mut buf = [0u8; 65536];
    loop {
        match sock.recv(&mut buf) {
            Ok(_) => {
                received += 1;
                last = Some(Instant::now());
                if expect > 0 && received >= expect {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving"),
        }
        if last.is_some_and(|l| l.elapsed().as_secs_f64() >= idle)
            || start.elapsed().as_secs_f64() >= max
        {
            break;
        }
    }
    println!("{}", serde_json::json!({"received": received}));
    Ok(())
}
