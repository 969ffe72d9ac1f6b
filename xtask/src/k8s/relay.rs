//! The API server relay: `kubectl` in the machine's own network namespace reaches the API
//! server in the control-plane namespace without a route or interface added to the machine's
//! namespace. The relay process binds 127.0.0.1:PORT (an ephemeral port) while still in the
//! machine's namespace, writes PORT to a file, then enters the control-plane namespace
//! (setns, before any other thread exists): the listening socket stays where it was made, and
//! every connection to the API server is made from inside. TCP_NODELAY on both sides (42 ms
//! per kubectl call instead of 93 ms).
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// Runs the relay until killed: listens on 127.0.0.1 (port written to `port_file`), forwards
/// every connection to `to` from inside the network namespace `netns`.
pub fn run(port_file: &Path, netns: &Path, to: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let ns = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    // SAFETY: plain syscall on an fd we own; the process is single-threaded here.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "entering {}: {}",
            netns.display(),
            std::io::Error::last_os_error()
        );
    }
    drop(ns);
    let tmp = port_file.with_extension("tmp");
    fs::write(&tmp, format!("{port}\n"))?;
    fs::rename(&tmp, port_file)?;
    eprintln!(
        "relay: 127.0.0.1:{port} (machine's namespace) -> {to} (in {})",
        netns.display()
    );
    for conn in listener.incoming() {
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        std::thread::spawn(move || {
            if let Err(e) = serve(client, to) {
                eprintln!("relay: {e:#}");
            }
        });
    }
    Ok(())
}

fn serve(client: TcpStream, to: SocketAddr) -> Result<()> {
    // Threads inherit the namespace of the thread that spawned them: this connect is made
    // inside the control-plane namespace.
    let server = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .with_context(|| format!("connecting to {to}"))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (c2, s2) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || pipe(c2, s2));
    pipe(server, client);
    let _ = up.join();
    Ok(())
}

/// Copies `from` to `to` until EOF or an error, then half-closes `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
