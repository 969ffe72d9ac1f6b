//! `podtrace topo POD [--dst IP] [--json]`.
use std::{net::Ipv4Addr, process::ExitCode};

use anyhow::Result;

use crate::cli::{parse_ipv4, PodArgs};

#[derive(clap::Args, Debug)]
pub struct TopoArgs {
    #[command(flatten)]
    pub pod: PodArgs,
    /// Explain the route the pod's packets to this address take.
    #[arg(long, value_name = "IP", value_parser = parse_ipv4)]
    pub dst: Option<Ipv4Addr>,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TopoArgs) -> Result<ExitCode> {
    let loc = args.pod.locate()?;
    let dest = args
        .dst
        .and_then(|ip| super::pod::lab_pod_by_ip(ip, args.pod.lab.as_deref()));
    let topo = super::resolve(&loc, args.dst, dest.as_ref())?;
    if args.json {
        println!("{}", super::render::json(&topo));
    } else {
        print!("{}", super::render::text(&topo));
    }
    Ok(ExitCode::SUCCESS)
}
