//! Who may see whose logs. Every Unix client is known by its `SO_PEERCRED`
//! credentials; a client sees only the logs and watches its own uid wrote
//! unless it is root, the daemon's own user, or listed in
//! `monitor.query_all_users` / `monitor.query_all_groups`. TCP clients
//! that showed the shared token, the operator's secret, see everything; a
//! client nobody can tell apart from any local user (TCP without a token,
//! under `monitor.allow_unauthenticated_tcp`) sees only what such clients
//! wrote.

use crate::fsperm;
use std::collections::HashSet;

/// The credentials of the process at the other end of a Unix socket, read
/// once when the connection is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Its effective uid.
    pub uid: u32,
    /// Its effective (primary) gid.
    pub gid: u32,
    /// Its process id (for the daemon's log; pids are reused).
    pub pid: i32,
}

/// Whose logs one client may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everyone's (and logs written over TCP, which have no uid).
    All,
    /// Only those written by this uid.
    Own(u32),
    /// Only those with no uid (written over TCP): a client that showed no
    /// token and has no credentials, who may be any local user.
    Anonymous,
}

/// The resolved `monitor.query_all_users` and `monitor.query_all_groups`,
/// plus the users who always see everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Uids that see everyone's logs: root, the daemon's user, the service
    /// user, the listed users and the members of the listed groups.
    all_uids: HashSet<u32>,
    /// Gids whose primary members see everyone's logs.
    all_gids: HashSet<u32>,
}

impl Access {
    /// Resolves the configured names (or numeric ids) against the user and
    /// group databases, now: a later change of group membership takes hold
    /// at the next start or SIGHUP. An unknown name is an error.
    pub fn resolve(
        users: &[String],
        groups: &[String],
        service_user: Option<&str>,
    ) -> Result<Access, String> {
        let (access, unknown) = Access::resolve_known(users, groups, service_user);
        match unknown.into_iter().next() {
            Some(error) => Err(error),
            None => Ok(access),
        }
    }

    /// As [`Access::resolve`], but leaves out the names it cannot resolve
    /// and returns one error for each: a reload must not keep the previous
    /// lists (and users the new ones removed) in force for a typo.
    pub fn resolve_known(
        users: &[String],
        groups: &[String],
        service_user: Option<&str>,
    ) -> (Access, Vec<String>) {
        let mut unknown = Vec::new();
        let mut all_uids: HashSet<u32> = [0, rustix::process::geteuid().as_raw()].into();
        if let Some(uid) = service_user.and_then(fsperm::lookup_user) {
            all_uids.insert(uid);
        }
        for user in users {
            match fsperm::lookup_user(user) {
                Some(uid) => {
                    all_uids.insert(uid);
                }
                None => unknown.push(format!("monitor.query_all_users: no such user `{user}`")),
            }
        }
        let mut all_gids = HashSet::new();
        for group in groups {
            match fsperm::lookup_group_members(group) {
                Some((gid, members)) => {
                    all_gids.insert(gid);
                    all_uids.extend(members.iter().filter_map(|m| fsperm::lookup_user(m)));
                }
                None => unknown.push(format!("monitor.query_all_groups: no such group `{group}`")),
            }
        }
        (Access { all_uids, all_gids }, unknown)
    }

    /// What a client may see: by its credentials when it has them (a Unix
    /// client), else everything if it showed the token (`holds_token`), else
    /// only what other such clients wrote.
    pub fn scope(&self, peer: Option<PeerCred>, holds_token: bool) -> Scope {
        match peer {
            None if holds_token => Scope::All,
            None => Scope::Anonymous,
            Some(p) if self.all_uids.contains(&p.uid) || self.all_gids.contains(&p.gid) => {
                Scope::All
            }
            Some(p) => Scope::Own(p.uid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Option<PeerCred> {
        Some(PeerCred { uid, gid, pid: 1 })
    }

    #[test]
    fn root_tcp_and_listed_users_see_all_and_others_only_their_own() {
        let access = Access::resolve(&["4321".into()], &[], None).unwrap();
        assert_eq!(access.scope(None, true), Scope::All);
        assert_eq!(access.scope(None, false), Scope::Anonymous);
        assert_eq!(access.scope(peer(0, 0), false), Scope::All);
        assert_eq!(access.scope(peer(4321, 4321), false), Scope::All);
        assert_eq!(access.scope(peer(1234, 1234), false), Scope::Own(1234));
        assert_eq!(access.scope(peer(1234, 1234), true), Scope::Own(1234));
        let own = rustix::process::geteuid().as_raw();
        assert_eq!(access.scope(peer(own, 77), false), Scope::All);
    }

    #[test]
    fn a_listed_group_counts_for_its_members_and_its_primary_users() {
        // `root` is a group on every Linux system, with gid 0.
        let access = Access::resolve(&[], &["root".into()], None).unwrap();
        assert_eq!(access.scope(peer(5555, 0), false), Scope::All);
        assert_eq!(access.scope(peer(5555, 5555), false), Scope::Own(5555));
    }

    #[test]
    fn unknown_names_are_errors_that_name_the_key() {
        let err = Access::resolve(&["no-such-user-x".into()], &[], None).unwrap_err();
        assert!(err.contains("monitor.query_all_users"), "{err}");
        let err = Access::resolve(&[], &["no-such-group-x".into()], None).unwrap_err();
        assert!(err.contains("monitor.query_all_groups"), "{err}");
        // Known names still count when others are unknown.
        let (access, unknown) =
            Access::resolve_known(&["4321".into(), "no-such-user-x".into()], &[], None);
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert_eq!(access.scope(peer(4321, 1), false), Scope::All);
        assert_eq!(access.scope(peer(1234, 1), false), Scope::Own(1234));
    }
}
