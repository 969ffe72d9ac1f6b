//! The `podtrace` command line. Each subcommand lives in its own module of the library; this
//! file only parses arguments, checks privileges and maps results to exit codes:
//! 0 success, 1 a negative verdict, 2 usage or runtime error (one line on stderr), and 2 as
//! well after an internal error (a panic: one line, see `podtrace::crash`).
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "podtrace",
    version,
    about = "eBPF packet path tracer for Kubernetes pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, inspect and tear down the lab: the seeds' flannel and ENI topologies in network
    /// namespaces.
    Lab(podtrace::lab::LabArgs),
    /// Resolve a pod's network path: its interfaces, host veth, bridge or VXLAN or ENI, and
    /// the routing decision towards --dst.
    Topo(podtrace::topology::cmd::TopoArgs),
    /// Follow a pod's packets to and from --dst hop by hop with eBPF: per-hop timing, where
    /// a packet died and why. Exit 0 when the expected path is confirmed, 1 otherwise.
    Follow(podtrace::follow::FollowArgs),
    /// Capture the pod's packets on every hop to rotating pcapng/pcap files.
    Capture(podtrace::capture::CaptureArgs),
    /// Checks with a verdict (exit 0 pass, 1 fail, 2 error).
    #[command(subcommand)]
    Verify(podtrace::verify::VerifyCommand),
    /// The node agent: serves this node's half of every session to a front end
    /// (`--agents`, `kubectl podtrace`) over gRPC.
    Agent(podtrace::agent::AgentArgs),
    /// The whole story in two minutes on the lab: topology, follow, a drop, a rotating
    /// capture, verify eni.
    Demo(podtrace::demo::DemoArgs),
    /// `kubectl podtrace …` (what this binary does when installed as `kubectl-podtrace`):
    /// follow, capture, topo, verify through the API server and the node agents; deploy,
    /// undeploy. `podtrace kubectl --help` says more.
    #[command(disable_help_flag = true)]
    Kubectl {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },
}

fn root() -> anyhow::Result<()> {
    podtrace::privilege::require_root()
}

/// Root, and SIGINT/SIGTERM as a request to stop that detaches everything on the way out.
fn tracing() -> anyhow::Result<()> {
    root()?;
    podtrace::signals::install()
}

fn main() -> ExitCode {
    podtrace::crash::install_hook();
    // Installed as `kubectl-podtrace` (kubectl runs it for `kubectl podtrace …`), or run as
    // `podtrace kubectl …`: the kubectl front end.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The guard of a podtrace's clsact filters (started by it, not by users).
    if argv
        .get(1)
        .is_some_and(|a| a == podtrace::probes::clsact::GUARD_ARG)
    {
        return podtrace::probes::clsact::guard_main(&argv[2..]);
    }
    podtrace::probes::clsact::enable_guards();
    let plugin = argv
        .first()
        .is_some_and(|a| podtrace::kubectl::invoked_as_plugin(a));
    if plugin || argv.get(1).is_some_and(|a| a == "kubectl") {
        if !plugin {
            argv.remove(1);
            argv[0] = "kubectl-podtrace".into();
        }
        let code =
            std::panic::catch_unwind(|| podtrace::kubectl::main(argv)).unwrap_or(ExitCode::from(2));
        if podtrace::crash::panicked() {
            return ExitCode::from(2);
        }
        return code;
    }
    // A panic unwinds to here, dropping probes and capture writers on its way (detached,
    // files completed); its one line is out already.
    let code = std::panic::catch_unwind(run).unwrap_or(ExitCode::from(2));
    if podtrace::crash::panicked() {
        // Also when a worker's panic was caught and the run went on.
        return ExitCode::from(2);
    }
    code
}

fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line, as every podtrace error: clap's first line without its "error: ".
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("podtrace: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let result = match cli.command {
        Command::Lab(args) => root().and_then(|()| podtrace::lab::run(args)),
        Command::Topo(args) => root().and_then(|()| podtrace::topology::cmd::run(args)),
        Command::Follow(args) => tracing().and_then(|()| podtrace::follow::run(args)),
        Command::Capture(args) => tracing().and_then(|()| podtrace::capture::run(args)),
        Command::Verify(cmd) => tracing().and_then(|()| podtrace::verify::run(cmd)),
        Command::Agent(args) => root().and_then(|()| {
            // The agent finds pods as the command line does.
            let chain = |lab: Option<&str>, runtime: Option<&str>| {
                podtrace::cli::PodArgs {
                    lab: lab.map(str::to_owned),
                    runtime_endpoint: runtime.map(str::to_owned),
                    ..Default::default()
                }
                .resolvers()
            };
            podtrace::agent::run(args, std::sync::Arc::new(chain))
        }),
        // The kubectl flow needs a kubeconfig, not root.
        Command::Demo(args) if args.kubernetes => podtrace::kubectl::demo::run(args.kube),
        Command::Demo(args) => root().and_then(|()| podtrace::demo::run(args)),
        // Taken in main() before parsing.
        Command::Kubectl { .. } => unreachable!("podtrace kubectl is handled before parsing"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // A worker thread's panic, turned into this error: its line is out already.
            if !podtrace::crash::panicked() {
                eprintln!("podtrace: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}
