//! Cooperative subconsumers: named members of a group share queues with no duplicate delivery.
//!
//! A group is a consumer name; its members register by name and receive batches leased to
//! them ([`Coop::coop_receive`]). A row is held by at most one
//! live member. A member that stays silent longer than the `dead_interval` a sibling passes
//! loses its rows to that sibling, under a fresh batch token, so its late outcomes report
//! `false`. [`Coop::coop_touch`] is the heartbeat that keeps a
//! slow member alive. No lock outlives a call, and each allocation writes only the receiving
//! member's own registry row, so siblings never queue behind one hot row.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::message::Delivery;
use crate::store::Store;

/// Cooperative subconsumers: members of a group that share queues with no duplicate delivery.
///
/// See the module documentation of `coop` for the model. The subscriber runtime drives it when
/// its options name a member ([`SubscriberOptions::subconsumer`](crate::SubscriberOptions::subconsumer)).
#[async_trait]
pub trait Coop: Store {
    /// Registers `member` for `queues`; idempotent and race-free: of concurrent first
    /// registrations exactly one reports [`Registration::New`]. Refreshes the heartbeat.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: registration is idempotent; call again.
    async fn coop_register(&self, member: &Member, queues: &[String]) -> Result<Registration>;

    /// Leases up to `max_messages` rows to the member under a fresh token, registering it on
    /// first use and stamping its heartbeat. Takes ready rows and, with a `dead_interval`,
    /// rows held by siblings silent for longer than that (their outcomes then report
    /// `false`). Rows held by live siblings are never taken, whatever their lease age.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`], [`Error::InvalidQueue`], [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe in the at-least-once sense: dropped after the database leased the rows to
    /// the member, they are not returned and are delivered again once `lease_ttl` has passed.
    /// Nothing is lost.
    async fn coop_receive(&self, params: &CoopReceive) -> Result<Vec<Delivery>>;

    /// The heartbeat: marks `member` alive now. `Ok(false)` if it is not registered.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a heartbeat; touching again is harmless.
    async fn coop_touch(&self, member: &Member) -> Result<bool>;

    /// Removes `member` from its group; see [`Unregister`] for the rows it holds. `Ok(false)`
    /// if it was not registered (a second unregister).
    ///
    /// # Errors
    ///
    /// [`Error::MemberHoldsMessages`] with [`Unregister::Fail`] while it holds rows;
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: one transaction, so a dropped call unregisters the member (with its rows
    /// handled) or changes nothing; call again.
    async fn coop_unregister(&self, member: &Member, handling: Unregister) -> Result<bool>;

    /// The members of `group`, by name, with what each holds.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: read-only; drop the call and make it again.
    async fn coop_members(&self, group: &str) -> Result<Vec<MemberInfo>>;
}

/// The longest group or member name, in bytes.
pub const MAX_MEMBER_NAME_LEN: usize = 100;

/// A member of a cooperative group: `(group, name)`.
///
/// Recorded in the `acquired_by` column of the rows it holds as `group/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    group: String,
    name: String,
}

impl Member {
    /// The member `name` of `group`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if either is empty, longer than 100 bytes, or contains `/` or a
    /// NUL character.
    pub fn new(group: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        let (group, name) = (group.into(), name.into());
        for (what, value) in [("group", &group), ("member", &name)] {
            if value.is_empty()
                || value.len() > MAX_MEMBER_NAME_LEN
                || value.contains('/')
                || value.contains('\0')
            {
                return Err(Error::InvalidArgument(format!(
                    "{what} name {value:?} must be 1 to {MAX_MEMBER_NAME_LEN} bytes without '/' or NUL"
                )));
            }
        }
        Ok(Member { group, name })
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The member's name within its group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `group/name`, as stored in `acquired_by`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.group, self.name)
    }
}

/// What [`coop_register`](crate::Coop::coop_register) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// This call registered the member.
    New,
    /// The member was registered already (its heartbeat was refreshed).
    Existing,
}

/// What to do with the rows a member holds when it unregisters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unregister {
    /// Refuse ([`Error::MemberHoldsMessages`]) while the member holds rows.
    Fail,
    /// Give held rows back for another attempt; a row reaching `max_attempts` attempts is
    /// dead-lettered instead.
    Requeue {
        /// The attempt limit (the requeue counts as an attempt).
        max_attempts: u32,
    },
}

/// The longest a receive leaves a member's `last_active` unrefreshed (see
/// [`CoopReceive::get_heartbeat_refresh`]).
pub const HEARTBEAT_REFRESH: Duration = Duration::from_millis(500);

/// Parameters of [`coop_receive`](Coop::coop_receive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoopReceive {
    member: Member,
    queues: Vec<String>,
    max_messages: u32,
    dead_interval: Option<Duration>,
    max_deliveries: Option<u32>,
}

impl CoopReceive {
    /// Receive up to `max_messages` of `queues` for `member`.
    pub fn new<Q: Into<String>>(
        member: Member,
        queues: impl IntoIterator<Item = Q>,
        max_messages: u32,
    ) -> Self {
        CoopReceive {
            member,
            queues: queues.into_iter().map(Into::into).collect(),
            max_messages,
            dead_interval: None,
            max_deliveries: None,
        }
    }

    /// Takes over rows held by siblings silent for longer than `interval`. Defaults to never
    /// taking over.
    #[must_use]
    pub fn dead_interval(mut self, interval: Duration) -> Self {
        self.dead_interval = Some(interval);
        self
    }

    /// Dead-letters rows already delivered this many times. Defaults to no limit.
    #[must_use]
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// The receiving member.
    pub fn get_member(&self) -> &Member {
        &self.member
    }

    /// The queues.
    pub fn get_queues(&self) -> &[String] {
        &self.queues
    }

    /// The batch limit.
    pub fn get_max_messages(&self) -> u32 {
        self.max_messages
    }

    /// The takeover threshold, if any.
    pub fn get_dead_interval(&self) -> Option<Duration> {
        self.dead_interval
    }

    /// The delivery limit, if any.
    pub fn get_max_deliveries(&self) -> Option<u32> {
        self.max_deliveries
    }

    /// How stale the member's `last_active` may be before a receive rewrites it: a quarter of
    /// the dead interval, at most [`HEARTBEAT_REFRESH`].
    ///
    /// A receive is also the member's heartbeat, but rewriting its registry row on every
    /// receive leaves one dead row version per receive, and while a long transaction holds
    /// the xmin horizon those versions pile up in the one row every receive reads. Refreshing
    /// only a stale heartbeat bounds that to a few versions a second, and a member that
    /// receives is still never seen silent for longer than a quarter of the dead interval.
    pub fn get_heartbeat_refresh(&self) -> Duration {
        self.dead_interval
            .map_or(HEARTBEAT_REFRESH, |d| d / 4)
            .min(HEARTBEAT_REFRESH)
    }

    /// Checks the parameters.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] or [`Error::InvalidQueue`].
    pub fn validate(&self) -> Result<()> {
        crate::fetch::check_queues("a cooperative receive", &self.queues)?;
        crate::fetch::check_limit("max_messages", self.max_messages)?;
        crate::fetch::check_max_deliveries(self.max_deliveries)
    }
}

/// A registered member and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemberInfo {
    /// The member's name.
    pub name: String,
    /// The queues it registered for (or last received from).
    pub queues: Vec<String>,
    /// When it registered.
    pub registered_at: DateTime<Utc>,
    /// Its last heartbeat: a touch, or a receive that found the previous heartbeat older than
    /// [`CoopReceive::get_heartbeat_refresh`].
    pub last_active: DateTime<Utc>,
    /// How many rows it holds now.
    pub held: i64,
}

impl MemberInfo {
    /// A member's row as [`Coop::coop_members`] reports it: registered for `queues` at
    /// `registered_at`, last heard from at `last_active`, holding `held` rows.
    ///
    /// For backends implementing [`Coop`] and for tests.
    pub fn new(
        name: String,
        queues: Vec<String>,
        registered_at: DateTime<Utc>,
        last_active: DateTime<Utc>,
        held: i64,
    ) -> Self {
        MemberInfo {
            name,
            queues,
            registered_at,
            last_active,
            held,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_validated() {
        assert_eq!(
            Member::new("billing", "a").expect("valid").key(),
            "billing/a"
        );
        for (g, m) in [
            ("", "a"),
            ("g", ""),
            ("g/x", "a"),
            ("g", "a/b"),
            ("g\0", "a"),
            ("g", "a\0"),
        ] {
            assert!(Member::new(g, m).is_err(), "{g:?} {m:?}");
        }
        assert!(Member::new("g", "x".repeat(101)).is_err());
    }
}
