//! Who answers on the other end of a connection to "the daemon".
//!
//! A Unix socket tells: `SO_PEERCRED` gives the user of the process that
//! listens, as the kernel recorded it, so no one can lie about it. TCP does
//! not, and on loopback any local user may listen on a free port. But the
//! other end of a loopback connection is a socket on this host, and the
//! kernel lists every TCP socket of this network namespace with its owner
//! in `/proc/net/tcp` and `/proc/net/tcp6`. The row whose local address is
//! our peer and whose remote address is us is exactly the socket that
//! accepted our connection (already accepted or still queued; either way it
//! belongs to the listener's owner), so there is no second listener to be
//! confused with and no race between checking and sending.

use crate::fsperm::{TrustedUsers, NOT_TRUSTED};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

/// The kernel's TCP socket tables.
const PROC_NET_TCP: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];
/// Reads of the tables before giving up on finding our connection (the
/// far end appears as soon as the handshake is done, which on loopback is
/// before `connect` returns; the retries only cover a slow machine).
const LOOKUPS: u32 = 4;
/// Pause between those reads.
const LOOKUP_PAUSE: Duration = Duration::from_millis(5);

/// Why the peer of a connection is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerProblem {
    /// It runs as (or was created by) this untrusted user.
    Foreign(u32),
    /// Its owner cannot be found out; why.
    Unknown(String),
}

impl std::fmt::Display for PeerProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            PeerProblem::Foreign(uid) => write!(f, "belongs to uid {uid}, {NOT_TRUSTED}"),
            PeerProblem::Unknown(why) => write!(f, "cannot be checked: {why}"),
        }
    }
}

/// Checks with `SO_PEERCRED` that the process listening on the other end
/// of `stream` runs as a trusted user.
pub fn check_unix_peer(stream: &UnixStream, trusted: &TrustedUsers) -> Result<(), PeerProblem> {
    match rustix::net::sockopt::socket_peercred(stream) {
        Ok(cred) if trusted.contains(cred.uid.as_raw()) => Ok(()),
        Ok(cred) => Err(PeerProblem::Foreign(cred.uid.as_raw())),
        Err(e) => Err(PeerProblem::Unknown(format!("SO_PEERCRED failed: {e}"))),
    }
}

/// True for an address on this host's loopback interface, including an
/// IPv4 loopback address written as IPv6 (`::ffff:127.0.0.1`).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Checks that the socket on the far end of the loopback connection
/// `stream` belongs to a trusted user, from the kernel's socket tables.
pub fn check_tcp_peer(stream: &TcpStream, trusted: &TrustedUsers) -> Result<(), PeerProblem> {
    let unknown = |what: &str, e: io::Error| PeerProblem::Unknown(format!("{what}: {e}"));
    let local = stream
        .local_addr()
        .map_err(|e| unknown("no local address", e))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| unknown("no peer address", e))?;
    for attempt in 1..=LOOKUPS {
        match tcp_peer_uid(&PROC_NET_TCP, local, peer) {
            Ok(Some(uid)) if trusted.contains(uid) => return Ok(()),
            Ok(Some(uid)) => return Err(PeerProblem::Foreign(uid)),
            Ok(None) if attempt < LOOKUPS => thread::sleep(LOOKUP_PAUSE),
            Ok(None) => {}
            Err(e) => return Err(unknown("cannot read /proc/net/tcp", e)),
        }
    }
    Err(PeerProblem::Unknown(format!(
        "/proc/net/tcp lists no socket for the far end of {local} -> {peer}"
    )))
}

/// The owner of the socket at the far end of the local connection from
/// `local` to `peer`, as listed in the `tables`; `None` if no row matches.
/// A missing table (no IPv6) is skipped; if none can be read, the error.
fn tcp_peer_uid(tables: &[&str], local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let mut read_any = None;
    for table in tables {
        let text = match fs::read_to_string(table) {
            Ok(text) => text,
            Err(e) => {
                read_any.get_or_insert(Err(e));
                continue;
            }
        };
        read_any = Some(Ok(()));
        let found = text
            .lines()
            .skip(1)
            .filter_map(parse_row)
            .find(|r| same(r.local, peer) && same(r.remote, local));
        if let Some(row) = found {
            return Ok(Some(row.uid));
        }
    }
    match read_any {
        Some(Err(e)) => Err(e),
        _ => Ok(None),
    }
}

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpRow {
    local: SocketAddr,
    remote: SocketAddr,
    uid: u32,
}

/// Parses `sl local_address rem_address st tx:rx tr:when retrnsmt uid ...`.
fn parse_row(line: &str) -> Option<TcpRow> {
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = parse_addr(fields.next()?)?;
    let remote = parse_addr(fields.next()?)?;
    let uid = fields.nth(4)?.parse().ok()?;
    Some(TcpRow { local, remote, uid })
}

/// `0100007F:1F4F` or a 32-digit IPv6 address and a port: the address is
/// printed as 32-bit words in the kernel's (host) byte order, the port as a
/// number.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Equal addresses, an IPv4-mapped IPv6 address (how a dual-stack socket
/// sees an IPv4 peer) counting as the IPv4 address it maps.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && plain(a.ip()) == plain(b.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn hex_v4(ip: Ipv4Addr) -> String {
        format!("{:08X}", u32::from_ne_bytes(ip.octets()))
    }

    #[test]
    fn rows_of_both_tables_parse() {
        let v4 = format!(
            "   3: {}:BF7D {}:D956 01 00000000:00000000 00:00000000 00000000 65534        0 0 1 0000000000000000 20 0 0 10 -1",
            hex_v4(Ipv4Addr::LOCALHOST),
            hex_v4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            parse_row(&v4),
            Some(TcpRow {
                local: "127.0.0.1:49021".parse().unwrap(),
                remote: "127.0.0.1:55638".parse().unwrap(),
                uid: 65534,
            })
        );
        let mapped: Ipv6Addr = "::ffff:127.0.0.1".parse().unwrap();
        let words: String = mapped
            .octets()
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes(w.try_into().unwrap())))
            .collect();
        let v6 = format!(
            "   0: {words}:2671 {words}:C350 01 00000000:00000000 00:00000000 00000000  1000        0 123 1 0000000000000000 20 0 0 10 -1"
        );
        let row = parse_row(&v6).unwrap();
        assert_eq!(row.uid, 1000);
        assert_eq!(row.local, SocketAddr::new(mapped.into(), 9841));
        assert!(same(row.local, "127.0.0.1:9841".parse().unwrap()));
        assert!(!same(row.local, "127.0.0.1:9842".parse().unwrap()));
        assert_eq!(
            parse_row("  sl  local_address rem_address   st tx_queue"),
            None
        );
    }

    #[test]
    fn loopback_means_this_host() {
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "0.0.0.0", "::", "::ffff:10.0.0.1", "192.0.2.1"] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    fn check(
        listener: &TcpListener,
        to: SocketAddr,
        trusted: &TrustedUsers,
    ) -> Result<(), PeerProblem> {
        let stream = TcpStream::connect(to).unwrap();
        let result = check_tcp_peer(&stream, trusted);
        drop(listener.accept().unwrap());
        result
    }

    #[test]
    fn a_listener_of_this_process_is_found_with_its_owner() {
        let me = TrustedUsers::current(None);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(check(&listener, addr, &me), Ok(()));
    }

    #[test]
    fn the_far_end_is_matched_not_our_own_end() {
        let client: SocketAddr = "127.0.0.1:55638".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:49021".parse().unwrap();
        let row = |from: SocketAddr, to: SocketAddr, uid: u32| {
            let hex = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => format!("{}:{:04X}", hex_v4(ip), a.port()),
                IpAddr::V6(_) => unreachable!(),
            };
            format!(
                "   1: {} {} 01 00000000:00000000 00:00000000 00000000 {uid:>5}        0 0 1 0 20 0 0 10 -1\n",
                hex(from),
                hex(to)
            )
        };
        let listening = format!(
            "   0: {}:{:04X} 00000000:0000 0A 00000000:00000001 00:00000000 00000000 1000 0 9 2 0 100 0 0 10 0\n",
            hex_v4(Ipv4Addr::LOCALHOST),
            server.port()
        );
        let text = format!(
            "  sl  local_address rem_address\n{listening}{}{}",
            row(client, server, 0),
            row(server, client, 65534)
        );
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("tcp");
        fs::write(&table, text).unwrap();
        let table = table.to_str().unwrap();
        assert_eq!(tcp_peer_uid(&[table], client, server).unwrap(), Some(65534));
        // An unrelated connection is not taken for ours.
        let other: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(tcp_peer_uid(&[table], other, server).unwrap(), None);
    }

    #[test]
    fn a_dual_stack_listener_is_found_for_an_ipv4_client() {
        let Ok(listener) = TcpListener::bind("[::]:0") else {
            return; // no IPv6 here
        };
        let port = listener.local_addr().unwrap().port();
        let me = TrustedUsers::current(None);
        assert_eq!(
            check(
                &listener,
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
                &me
            ),
            Ok(())
        );
    }

    #[test]
    fn unreadable_tables_are_an_error_and_missing_rows_are_none() {
        let local = "127.0.0.1:1".parse().unwrap();
        let peer = "127.0.0.1:2".parse().unwrap();
        assert!(tcp_peer_uid(&["/nonexistent/tcp"], local, peer).is_err());
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("tcp");
        fs::write(&table, "  sl  local_address rem_address\n").unwrap();
        let table = table.to_str().unwrap();
        assert_eq!(
            tcp_peer_uid(&[table, "/nonexistent/tcp6"], local, peer).unwrap(),
            None
        );
    }
}
