//! The capture filter: a subset of tcpdump's filter language (pcap-filter(7)), evaluated in
//! userspace against a [`PacketSummary`].
//!
//! # Supported
//!
//! | primitive | matches |
//! |---|---|
//! | `host A`, `src host A`, `dst host A`, `src A`, `dst A`, bare `A` | IPv4 source and/or destination address `A` |
//! | `net N/LEN`, `net N mask M`, `net 10.244` (abbreviated: /8, /16, /24), with `src`/`dst` | address within the network |
//! | `port N`, `src port N`, `dst port N`, `tcp port N`, `udp dst port N` | TCP or UDP port (the protocol only if given) |
//! | `tcp`, `udp`, `icmp`, `ip`, `proto N`, `ip proto N` / `ip proto \tcp` | IP protocol / any IPv4 |
//! | `src or dst ...`, `src and dst ...` | either / both addresses or ports |
//!
//! combined with `and`/`&&`, `or`/`||`, `not`/`!` and parentheses. The words of the command
//! line (`EXPR...`) are joined with spaces first, as tcpdump does.
//!
//! **Precedence is tcpdump's**: `not` binds tightest, while `and` and `or` have *equal*
//! precedence and associate left to right, so `host A or host B and tcp` means
//! `(host A or host B) and tcp`. As in tcpdump, a bare value after `and`/`or` repeats the
//! previous qualifiers: `port 80 or 443` is `port 80 or port 443`, and `not host A and B`
//! is `not host A and host B`.
//!
//! For VXLAN frames the filter sees the **inner** (pod) headers (see
//! [`parse_ethernet`](super::parse_ethernet)), so `host 10.244.1.5` matches that pod's traffic
//! on the underlay too, and `udp port 8472` does not match VXLAN frames.
//!
//! # Not supported
//!
//! Everything else (`portrange`, `ether`, `arp`, `ip6`, `vlan`, `less`/`greater`, byte
//! offsets like `tcp[13]`, host names, port names, ...) is rejected with a
//! [`FilterError`] naming the word, e.g. ``unsupported filter syntax near "portrange": ...``.
//! IPv6 is not supported. Only IPv4 packets can match a primitive (`host` does not match ARP
//! as it does in tcpdump).
//!
//! # Limits
//!
//! An expression holds at most [`MAX_PRIMITIVES`] primitives and nests parentheses and
//! negations at most [`MAX_NESTING`] deep; longer or deeper ones are rejected (tcpdump's
//! kernel filters cannot hold that many tests either). Words are ASCII: a non-ASCII
//! character (a typographic quote or dash pasted from a document, a no-break space) is an
//! error naming it.
//!
//! # Where things are
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`CaptureFilter`], the entry point: parse, match, prefilter |
//! | `lexer.rs` | text to tokens |
//! | `parser.rs` | tokens to an [`Expr`]: grammar, qualifiers, values, unsupported syntax |
//! | `expr.rs` | [`Expr`], [`Primitive`], [`Dir`], [`Ipv4Net`]: matching and canonical printing |
//! | `prefilter.rs` | [`PreFilter`], necessary conditions for a cheaper first stage |
//! | `error.rs` | [`FilterError`] |
//! | `tests.rs` | the language's tests, and regression tests for every crash fuzzing found |

use std::fmt;
use std::str::FromStr;

mod error;
mod expr;
mod lexer;
mod parser;
mod prefilter;

pub use error::{FilterError, FilterErrorKind};
pub use expr::{Dir, Expr, Ipv4Net, Primitive};
pub use parser::{MAX_NESTING, MAX_PRIMITIVES};
pub use prefilter::PreFilter;

use crate::pcap::packet::PacketSummary;

/// A capture filter: the parsed expression plus the text it came from.
///
/// An empty expression matches every packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureFilter {
    text: String,
    expr: Option<Expr>,
}

impl CaptureFilter {
    /// A filter that matches everything (no expression given).
    pub fn match_all() -> Self {
        CaptureFilter {
            text: String::new(),
            expr: None,
        }
    }

    /// Parse the expression words of a command line (`EXPR...`), joined with spaces as
    /// tcpdump does, so `["host", "10.0.0.1", "and", "tcp"]` and `["host 10.0.0.1 and tcp"]`
    /// are the same filter.
    pub fn parse_args<I, S>(words: I) -> Result<Self, FilterError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let joined = words
            .into_iter()
            .map(|w| w.as_ref().to_string())
            .collect::<Vec<_>>()
            .join(" ");
        Self::parse(&joined)
    }

    /// Parse one expression string.
    ///
    /// Never panics, whatever the text: anything that is not a valid expression within the
    /// [limits](self#limits) is a [`FilterError`].
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let tokens = lexer::tokenize(text)?;
        let expr = parser::parse(tokens)?;
        Ok(CaptureFilter {
            text: text.trim().to_string(),
            expr,
        })
    }

    /// Whether the packet passes the filter.
    pub fn matches(&self, p: &PacketSummary) -> bool {
        self.expr.as_ref().is_none_or(|e| e.matches(p))
    }

    /// Whether this filter accepts every packet (no expression).
    pub fn is_match_all(&self) -> bool {
        self.expr.is_none()
    }

    /// The expression as the user wrote it (words joined with spaces); empty for
    /// [`match_all`](Self::match_all). Recorded in pcapng `if_filter`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The parsed expression, `None` for match-all.
    pub fn expr(&self) -> Option<&Expr> {
        self.expr.as_ref()
    }

    /// Necessary conditions for a match, e.g. for a cheaper first-stage filter in the kernel.
    /// See [`PreFilter`].
    pub fn prefilter(&self) -> PreFilter {
        self.expr
            .as_ref()
            .map(PreFilter::of)
            .unwrap_or_else(PreFilter::unconstrained)
    }
}

impl Default for CaptureFilter {
    fn default() -> Self {
        Self::match_all()
    }
}

impl FromStr for CaptureFilter {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CaptureFilter {
    /// The canonical form of the expression (empty for match-all).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.expr {
            Some(e) => write!(f, "{e}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
