//! Idle sessions in paired windows: many more samples of what an idle `follow` costs than
//! the interleaved runs of [`super::overhead`] give, from one iperf3 flow that runs through the
//! whole section.
//!
//! On a 2-core VM a full-speed iperf3 figure moves by ±8 % from one 4 s window to the next,
//! around baselines that move as much, so an idle session's cost of a few % needs tens of
//! paired samples, not 5. Here the flow never stops (no connection set-up or slow start in a
//! window), and the configurations take turns beside it in windows with a baseline window
//! (nothing attached) between every two. Per window: the throughput the peer's eth0 received,
//! and the machine's busy CPU time (user, nice, system, irq, softirq of all CPUs, from
//! /proc/stat; the host's steal left out) per GB of it. Each configuration's window is
//! compared with the mean of the baseline windows on either side of it. A session's window
//! starts only once it has settled as a session left on does (its idle hooks gone).
use std::{
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    overhead::{self, Config},
    proc::{self, Stream},
    Ctx, Stat, DST_IP, PEER, POD,
};

/// One window of traffic beside one configuration.
#[derive(Debug, Clone)]
pub struct Window {
    pub config: Config,
    /// Its length (s).
    pub secs: f64,
    /// CPU seconds the machine was busy in it, all CPUs together, the host's steal left out.
    pub busy_s: f64,
    /// CPU seconds the host took from the machine's CPUs in it (steal).
    pub steal_s: f64,
    /// Bytes the peer's eth0 received in it.
    pub bytes: u64,
}

impl Window {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e9 / self.secs.max(1e-9)
    }

    /// The machine's busy CPU seconds per GB received.
    pub fn cpu_s_per_gb(&self) -> f64 {
        self.busy_s / (self.bytes as f64 / 1e9).max(1e-9)
    }
}

pub struct Results {
    pub window_s: u32,
    pub cycles: usize,
    /// The configurations compared with the baseline, in their order within a cycle.
    pub configs: Vec<Config>,
    /// Every window, in the order they ran (a baseline between every two others).
    pub windows: Vec<Window>,
}

/// For each window of `c`: `f` of it over the mean of `f` of the baseline windows next to it.
fn paired(windows: &[Window], c: Config, f: impl Fn(&Window) -> f64) -> Vec<f64> {
    windows
        .iter()
        .enumerate()
        .filter(|(_, w)| w.config == c)
        .filter_map(|(i, w)| {
            let around: Vec<f64> = [i.checked_sub(1), Some(i + 1)]
                .into_iter()
                .flatten()
                .filter_map(|j| windows.get(j))
                .filter(|b| b.config == Config::Baseline)
                .map(&f)
                .collect();
            if around.is_empty() {
                return None;
            }
            let base = around.iter().sum::<f64>() / around.len() as f64;
            Some(f(w) / base)
        })
        .collect()
}

/// For each window of `c`: its throughput over the mean of the baseline windows next to it.
pub fn ratios(windows: &[Window], c: Config) -> Vec<f64> {
    paired(windows, c, Window::gbps)
}

/// For each window of `c`: its CPU per GB over the mean of the baseline windows next to it,
/// as the extra CPU in %.
pub fn extra_pcts(windows: &[Window], c: Config) -> Vec<f64> {
    paired(windows, c, Window::cpu_s_per_gb)
        .into_iter()
        .map(|r| (r - 1.0) * 100.0)
        .collect()
}

/// The order of the windows: a baseline, then each configuration followed by a baseline,
/// `cycles` times.
pub fn window_order(configs: &[Config], cycles: usize) -> Vec<Config> {
    let mut order = vec![Config::Baseline];
    for _ in 0..cycles {
        for c in configs {
            order.push(*c);
            order.push(Config::Baseline);
        }
    }
    order
}

impl Results {
    fn of(&self, c: Config) -> impl Iterator<Item = &Window> {
        self.windows.iter().filter(move |w| w.config == c)
    }

    /// The throughput of `c`'s windows over the baselines around them.
    pub fn ratios(&self, c: Config) -> Vec<f64> {
        ratios(&self.windows, c)
    }

    /// The extra CPU per GB of `c`'s windows over the baselines around them (%).
    pub fn extra(&self, c: Config) -> Option<Stat> {
        Stat::of(&extra_pcts(&self.windows, c))
    }

    pub fn cpu_per_gb(&self, c: Config) -> Option<Stat> {
        Stat::of(&self.of(c).map(Window::cpu_s_per_gb).collect::<Vec<_>>())
    }

    pub fn gbps(&self, c: Config) -> Option<Stat> {
        Stat::of(&self.of(c).map(Window::gbps).collect::<Vec<_>>())
    }

    pub fn steal(&self, c: Config) -> Option<Stat> {
        Stat::of(&self.of(c).map(|w| w.steal_s).collect::<Vec<_>>())
    }

    /// The floor measured here (TCX's hook alone, or clsact's where TCX is missing).
    pub fn floor(&self) -> Option<Config> {
        self.configs
            .iter()
            .copied()
            .find(|c| matches!(c, Config::TcxHookAlone | Config::TcHookAlone))
    }

    pub fn to_json(&self) -> Value {
        let st = |x: Option<Stat>, d: i32| x.map(|s| s.to_json(d));
        let configs: Vec<Value> = [Config::Baseline]
            .iter()
            .chain(&self.configs)
            .map(|c| {
                json!({
                    "config": c.key(),
                    "command": c.label(),
                    "gbps": st(self.gbps(*c), 3),
                    "ratio_of_baseline": st(Stat::of(&self.ratios(*c)), 3),
                    "ratio_of_baseline_median_interval": super::median_interval(&self.ratios(*c)).map(|i| json!({"low": i.low, "high": i.high, "confidence": i.confidence})),
                    "cpu_s_per_gb": st(self.cpu_per_gb(*c), 4),
                    "extra_cpu_pct_over_baseline": st(self.extra(*c), 2),
                    "steal_s": st(self.steal(*c), 2),
                })
            })
            .collect();
        json!({
            "window_s": self.window_s,
            "cycles": self.cycles,
            "method": "one iperf3 TCP flow at full speed for the whole section; the configurations take turns beside it in windows, a baseline window between every two; per window the throughput the peer's eth0 received and the machine's busy CPU seconds (user+nice+system+irq+softirq of all CPUs, /proc/stat, steal left out) per GB of it; each window of a configuration over the mean of the baseline windows on either side of it",
            "configs": configs,
            "windows": self.windows.iter().map(|w| json!({
                "config": w.config.key(),
                "secs": (w.secs * 1000.0).round() / 1000.0,
                "busy_s": (w.busy_s * 100.0).round() / 100.0,
                "steal_s": (w.steal_s * 100.0).round() / 100.0,
                "bytes": w.bytes,
            })).collect::<Vec<_>>(),
        })
    }

    /// The report's section.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "\n## Idle sessions in paired windows\n\nA full-speed iperf3 figure on this machine moves by several % from one window to the next, around baselines that move as much: the 5 interleaved runs above cannot place an idle session's cost of a few % on either side of a goal. Here more samples: one iperf3 TCP flow {POD} → {PEER} at full speed runs through the whole section, and the configurations take turns beside it in {} s windows, a baseline window (nothing attached) between every two, {} cycle(s). Per window: the throughput {PEER}'s eth0 received, and the machine's busy CPU time (user, nice, system, irq and softirq of all CPUs, from /proc/stat; the host's steal left out) per GB of it. × baseline and extra CPU: each window of a configuration over the mean of the baseline windows on either side of it, then min / **median** / max, and the interval that holds the median with ≥ 95 % confidence (order statistics, no assumption on the noise's shape). A session's window starts once it has settled as one left on does (its route lookup and transmit hooks gone); a floor's a second after its hooks are on.\n\n| configuration | windows | Gbit/s | × baseline | median's interval | CPU s per GB | extra CPU per GB | steal (s per window) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
            self.window_s, self.cycles
        );
        let show = |x: Option<Stat>, f: &dyn Fn(f64) -> String| {
            x.map(|s| s.show(f)).unwrap_or_else(|| "–".into())
        };
        for c in [Config::Baseline].iter().chain(&self.configs) {
            let base = *c == Config::Baseline;
            let ratios = self.ratios(*c);
            let paired = |v: String| if base { "–".to_owned() } else { v };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                c.label(),
                self.of(*c).count(),
                show(self.gbps(*c), &|x| format!("{x:.2}")),
                if base {
                    "1".into()
                } else {
                    show(Stat::of(&ratios), &|x| format!("{x:.3}"))
                },
                paired(
                    super::median_interval(&ratios)
                        .map(|i| i.show(|x| format!("{x:.3}")))
                        .unwrap_or_else(|| "–".into())
                ),
                show(self.cpu_per_gb(*c), &|x| format!("{x:.3}")),
                paired(show(self.extra(*c), &|x| format!("{x:+.1} %"))),
                show(self.steal(*c), &|x| format!("{x:.2}")),
            ));
        }
        s
    }
}

/// The machine's (busy, steal) CPU seconds since boot, all CPUs together, from /proc/stat.
fn cpu_times() -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_cpu_line(stat.lines().next().unwrap_or_default())
        .context("/proc/stat has no cpu line")
        .map(|(busy, steal)| {
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            (busy as f64 / hz, steal as f64 / hz)
        })
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice` → (user + nice +
/// system + irq + softirq, steal) in ticks (guest time is part of user already).
pub fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    Some((v[0] + v[1] + v[2] + v[5] + v[6], v[7]))
}

/// The bytes `dev` received, from `/proc/net/dev` as seen from the network namespace at
/// `ns` (read on a thread of its own that enters it).
fn rx_bytes(ns: &str, dev: &str) -> Result<u64> {
    let (ns, dev) = (ns.to_owned(), dev.to_owned());
    std::thread::spawn(move || -> Result<u64> {
        let f = std::fs::File::open(&ns).with_context(|| format!("opening {ns}"))?;
        // SAFETY: setns on a namespace file this thread holds open; the thread ends after.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering {ns}: {}", std::io::Error::last_os_error());
        }
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")
            .context("reading /proc/thread-self/net/dev")?;
        parse_rx_bytes(&text, &dev).with_context(|| format!("{dev} is not in {ns}"))
    })
    .join()
    .map_err(|_| anyhow!("the thread reading {} panicked", "/proc/net/dev"))?
}

/// A device's received bytes in the text of `/proc/net/dev`.
pub fn parse_rx_bytes(text: &str, dev: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        (name.trim() == dev).then(|| rest.split_whitespace().next()?.parse().ok())?
    })
}

pub fn measure(ctx: &Ctx, cycles: usize, window_s: u32) -> Result<Results> {
    let floor = if Config::TcxHookAlone.runs_here() {
        Config::TcxHookAlone
    } else {
        Config::TcHookAlone
    };
    // The two idle goals, and the floor under them.
    let configs = vec![Config::FollowOtherPort, floor, Config::FollowOtherPeer];
    let order = window_order(&configs, cycles);
    eprintln!(
        "bench: idle sessions in paired windows, iperf3 TCP {POD} → {PEER}, {} windows of {window_s} s",
        order.len()
    );
    let _server = overhead::iperf_server(ctx)?;
    let mut client = ctx.lab.spawn_in(
        "iperf3 client (windows)",
        POD,
        &[
            "iperf3".into(),
            "-c".into(),
            DST_IP.into(),
            "-t".into(),
            "86400".into(),
        ],
    )?;
    let ns = format!("/run/netns/{}{PEER}", ctx.lab.prefix);
    // The flow's start (connection, slow start) before the first window.
    proc::sleep(Duration::from_secs(2))?;
    let mut windows = Vec::new();
    for (i, c) in order.iter().enumerate() {
        ctx.scratch.clear()?;
        let attached =
            overhead::attach(ctx, *c).with_context(|| format!("starting {}", c.key()))?;
        proc::sleep(Duration::from_secs(1))?;
        if let Some(exit) = client.try_reap() {
            bail!(
                "the iperf3 client of the windows ended ({}): {}",
                exit.describe(),
                proc::last_lines(&client.text(Stream::Err), 3)
            );
        }
        let (busy0, steal0) = cpu_times()?;
        let rx0 = rx_bytes(&ns, "eth0")?;
        let t0 = Instant::now();
        proc::sleep(Duration::from_secs(window_s as u64))?;
        let (busy1, steal1) = cpu_times()?;
        let rx1 = rx_bytes(&ns, "eth0")?;
        let w = Window {
            config: *c,
            secs: t0.elapsed().as_secs_f64(),
            busy_s: busy1 - busy0,
            steal_s: steal1 - steal0,
            bytes: rx1.saturating_sub(rx0),
        };
        let mut run = overhead::Run::default();
        overhead::detach(attached, &mut run).with_context(|| format!("stopping {}", c.key()))?;
        eprintln!(
            "bench:   window {}/{} {:<26} {:5.2} Gbit/s, {:.3} CPU s per GB, steal {:.2} s{}",
            i + 1,
            order.len(),
            c.key(),
            w.gbps(),
            w.cpu_s_per_gb(),
            w.steal_s,
            windows
                .last()
                .filter(|_| *c != Config::Baseline)
                .map(|b: &Window| format!(" ({:.3}× the baseline before it)", w.gbps() / b.gbps()))
                .unwrap_or_default()
        );
        windows.push(w);
    }
    drop(client);
    Ok(Results {
        window_s,
        cycles,
        configs,
        windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(config: Config, busy_s: f64, gb: f64) -> Window {
        Window {
            config,
            secs: 8.0,
            busy_s,
            steal_s: 0.0,
            bytes: (gb * 1e9) as u64,
        }
    }

    #[test]
    fn a_window_is_judged_against_the_baseline_windows_around_it() {
        let b = Config::Baseline;
        let x = Config::FollowOtherPort;
        let ws = [
            w(b, 10.0, 5.0), // 2.0 s/GB
            w(x, 11.0, 5.0), // 2.2: over (2.0 + 2.4) / 2
            w(b, 12.0, 5.0), // 2.4
            w(Config::TcxHookAlone, 2.4, 1.0),
            w(b, 12.0, 5.0),
            w(x, 4.4, 2.0), // 2.2 over 2.4, no baseline after it
        ];
        let e = extra_pcts(&ws, x);
        assert_eq!(e.len(), 2);
        assert!(e[0].abs() < 1e-9, "{e:?}");
        assert!((e[1] - (2.2 / 2.4 - 1.0) * 100.0).abs() < 1e-9, "{e:?}");
        assert_eq!(extra_pcts(&ws, Config::TcxHookAlone), vec![0.0]);
        assert!(extra_pcts(&ws, Config::FollowOtherPeer).is_empty());
    }

    #[test]
    fn every_window_has_a_baseline_on_each_side() {
        let configs = [Config::FollowOtherPort, Config::TcxHookAlone];
        let order = window_order(&configs, 3);
        assert_eq!(order.len(), 1 + 3 * 2 * 2);
        for (i, c) in order.iter().enumerate() {
            if *c != Config::Baseline {
                assert_eq!(order[i - 1], Config::Baseline);
                assert_eq!(order[i + 1], Config::Baseline);
            }
        }
        assert_eq!(
            order
                .iter()
                .filter(|c| **c == Config::FollowOtherPort)
                .count(),
            3
        );
    }

    #[test]
    fn proc_parsers() {
        assert_eq!(
            parse_cpu_line("cpu  100 5 50 1000 7 3 20 9 4 0"),
            Some((178, 9))
        );
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_line("cpu  1 2 x"), None);
        let dev = "Inter-|   Receive\n face |bytes    packets\n    lo:       0       0    0    0\n  eth0: 123456789  4242    0    0\n";
        assert_eq!(parse_rx_bytes(dev, "eth0"), Some(123_456_789));
        assert_eq!(parse_rx_bytes(dev, "lo"), Some(0));
        assert_eq!(parse_rx_bytes(dev, "eth1"), None);
    }
}
