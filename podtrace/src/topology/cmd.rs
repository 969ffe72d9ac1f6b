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
    let chain = args.pod.resolvers();
    let loc = args.pod.locate(&chain)?;
    let dest = args.dst.and_then(|ip| chain.by_ip(ip));
    let topo = super::resolve(&loc, args.dst, dest.as_ref(), &chain)?;
    if args.json {
        println!("{}", super::render::json(&topo));
    } else {
        print!("{}", super::render::text(&topo));
    }
    Ok(ExitCode::SUCCESS)
}
