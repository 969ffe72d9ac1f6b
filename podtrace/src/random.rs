//! Random bytes and hex names from the kernel (lab device names, session ids).
use anyhow::{bail, Context as _, Result};

/// Random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into buf[filled..].
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("getrandom");
        }
        filled += n as usize;
    }
    Ok(buf)
}

/// `len` random lowercase hex digits.
pub fn random_hex(len: usize) -> Result<String> {
    let bytes = random_bytes::<16>()?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if len > hex.len() {
        bail!("random_hex: at most {} digits", hex.len());
    }
    Ok(hex[..len].to_owned())
}
