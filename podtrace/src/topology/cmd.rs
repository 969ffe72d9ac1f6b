//! `podtrace topo POD [--dst IP] [--json]`.
use std::{net::Ipv4Addr, process::ExitCode};

use anyhow::Result;

use crate::{
    cli::{parse_ipv4, PodArgs, RemoteArgs},
    pods::{Chain, PodLocation},
    services,
};

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
    #[command(flatten)]
    pub remote: RemoteArgs,
}

pub fn run(args: TopoArgs) -> Result<ExitCode> {
    if args.remote.config(args.pod.lab.as_deref())?.is_some() {
        // Through agents: the halves of the nodes involved, stitched.
        let path = crate::front::resolve(&args.pod, &args.remote, args.dst)?;
        if args.json {
            let mut v = serde_json::to_value(&path.topo)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("unobserved".into(), serde_json::to_value(&path.unobserved)?);
            }
            println!("{v}");
        } else {
            print!("{}", super::render::text(&path.topo));
            for u in &path.unobserved {
                println!("not resolved: {u}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let chain = args.pod.resolvers();
    let loc = args.pod.locate(&chain)?;
    if let Some(code) = service_destination(&args, &loc, &chain)? {
        return Ok(code);
    }
    let dest = args.dst.and_then(|ip| chain.by_ip(ip));
    let topo = super::resolve(&loc, args.dst, dest.as_ref(), &chain)?;
    // The node's source NAT of this destination, when its rules have one.
    let snat = match (topo.pod_ip, args.dst) {
        (Some(src), Some(dst)) => services::topo::snat(
            Some(std::path::Path::new(&topo.pod.node_netns)),
            &topo.pod.node,
            src,
            dst,
        )
        .map(|a| (a, src, dst)),
        _ => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&topo)?;
        if let (Some((a, _, _)), Some(o)) = (&snat, v.as_object_mut()) {
            o.insert("snat".into(), serde_json::to_value(a)?);
        }
        println!("{v}");
    } else {
        print!("{}", super::render::text(&topo));
        if let Some((a, src, dst)) = &snat {
            print!("{}", services::topo::snat_text(a, *src, *dst));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A Service address is rewritten on the node before any route is looked up: for one,
/// `topo` shows the pod's own hops and the Service with its backends (from the node's
/// rules) instead of a route to the address.
fn service_destination(
    args: &TopoArgs,
    loc: &PodLocation,
    chain: &Chain,
) -> Result<Option<ExitCode>> {
    let Some(dst) = args.dst else {
        return Ok(None);
    };
    let Some(svc) = services::topo::lookup(loc.node_netns.as_deref(), &loc.node, dst, chain) else {
        return Ok(None);
    };
    let topo = super::resolve(loc, None, None, chain)?;
    if args.json {
        let mut v = serde_json::to_value(&topo)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("service".into(), serde_json::to_value(&svc)?);
        }
        println!("{v}");
    } else {
        print!("{}", super::render::text(&topo));
        println!();
        print!("{}", services::topo::service_text(&svc));
    }
    Ok(Some(ExitCode::SUCCESS))
}
