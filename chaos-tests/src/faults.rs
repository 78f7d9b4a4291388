//! Network faults, as nft rules inside the hosts' namespaces.
//!
//! Every host gets the same two tables when it is made ([`BASE_TABLES`]):
//!
//! ```text
//!  table inet chaos
//!    chain early_out  output, priority -300: sees the destination a process
//!                     asked for, before any DNAT (cut, isolate, loss)
//!    chain in         input: isolate
//!    chain late_out   output, priority 0: resets connections that predate a
//!                     proxy redirect, so they reconnect through it
//!  table ip chaosnat
//!    chain out        nat output: DNAT to a fault proxy on the hub (delay)
//! ```
//!
//! A fault adds rules; [`heal`] flushes the chains of every host. Loss is
//! `numgen random` in nft (real packets dropped, TCP retransmits); delay
//! needs the userspace [`crate::proxy::FaultProxy`], since this kernel has
//! no `netem`.

use crate::netns::{Host, nft};

/// The tables every host starts with (empty chains, policy accept).
pub const BASE_TABLES: &str = "
table inet chaos {
  chain early_out { type filter hook output priority -300; policy accept; }
  chain in { type filter hook input priority 0; policy accept; }
  chain late_out { type filter hook output priority 0; policy accept; }
}
table ip chaosnat {
  chain out { type nat hook output priority -100; policy accept; }
}
";

/// Drops what `from` sends to `to` (one way). Connections between them
/// stall: a TCP peer sees silence, not a reset.
pub fn cut_one_way(from: &Host, to: &Host) -> anyhow::Result<()> {
    nft(&from.ns, &format!("add rule inet chaos early_out ip daddr {} drop\n", to.ip))
}

/// Drops what `a` and `b` send each other.
pub fn cut(a: &Host, b: &Host) -> anyhow::Result<()> {
    cut_one_way(a, b)?;
    cut_one_way(b, a)
}

/// Drops everything `h` sends or receives except on loopback (the hub's
/// clients cannot reach it either).
pub fn isolate(h: &Host) -> anyhow::Result<()> {
    nft(&h.ns, "add rule inet chaos early_out oifname != \"lo\" drop\nadd rule inet chaos in iifname != \"lo\" drop\n")
}

/// Drops `percent`% of the packets `a` and `b` send each other, at random.
pub fn loss(a: &Host, b: &Host, percent: u8) -> anyhow::Result<()> {
    for (x, y) in [(a, b), (b, a)] {
        nft(
            &x.ns,
            &format!("add rule inet chaos early_out ip daddr {} numgen random mod 100 < {percent} drop\n", y.ip),
        )?;
    }
    Ok(())
}

/// Sends what `from` opens to `to:port` through `proxy` (an address on the
/// hub) instead, and resets the connections opened before, so that they
/// reconnect through it.
pub fn redirect(from: &Host, to: &Host, port: u16, proxy: std::net::SocketAddr) -> anyhow::Result<()> {
    nft(
        &from.ns,
        &format!(
            "add rule ip chaosnat out ip daddr {} tcp dport {port} dnat to {proxy}\n\
             add rule inet chaos late_out ip daddr {} tcp dport {port} reject with tcp reset\n",
            to.ip, to.ip
        ),
    )
}

/// Removes every fault rule of `hosts` (proxy redirects included).
pub fn heal(hosts: &[Host]) -> anyhow::Result<()> {
    for h in hosts {
        nft(
            &h.ns,
            "flush chain inet chaos early_out\nflush chain inet chaos in\nflush chain inet chaos late_out\nflush chain ip chaosnat out\n",
        )?;
    }
    Ok(())
}

/// Removes only the network partitions of `hosts` (cut, isolate, loss),
/// keeping proxy redirects.
pub fn heal_partitions(hosts: &[Host]) -> anyhow::Result<()> {
    for h in hosts {
        nft(&h.ns, "flush chain inet chaos early_out\nflush chain inet chaos in\n")?;
    }
    Ok(())
}
