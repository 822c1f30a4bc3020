//! Cooperative subconsumers: named members of a group share queues with no duplicate delivery.
//!
//! A group is a consumer name; its members register by name and receive batches leased to
//! them ([`Backend::coop_receive`](crate::Backend::coop_receive)). A row is held by at most one
//! live member. A member that stays silent longer than the `dead_interval` a sibling passes
//! loses its rows to that sibling, under a fresh batch token, so its late outcomes report
//! `false`. [`Backend::coop_touch`](crate::Backend::coop_touch) is the heartbeat that keeps a
//! slow member alive. No lock outlives a call, and each allocation writes only the receiving
//! member's own registry row, so siblings never queue behind one hot row.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::message::validate_queue;

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

/// What [`coop_register`](crate::Backend::coop_register) found.
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
/// [`CoopReceive::heartbeat_refresh`]).
pub const HEARTBEAT_REFRESH: Duration = Duration::from_millis(500);

/// Parameters of [`coop_receive`](crate::Backend::coop_receive).
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
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// The queues.
    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// The batch limit.
    pub fn max_messages(&self) -> u32 {
        self.max_messages
    }

    /// The takeover threshold, if any.
    pub fn dead_after(&self) -> Option<Duration> {
        self.dead_interval
    }

    /// The delivery limit, if any.
    pub fn delivery_limit(&self) -> Option<u32> {
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
    pub fn heartbeat_refresh(&self) -> Duration {
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
        crate::FetchParams::new(self.queues.iter().cloned(), self.max_messages).validate()?;
        self.queues.iter().try_for_each(|q| validate_queue(q))?;
        if self.max_deliveries == Some(0) {
            return Err(Error::InvalidArgument(
                "max_deliveries must be at least 1".into(),
            ));
        }
        Ok(())
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
    /// [`CoopReceive::heartbeat_refresh`].
    pub last_active: DateTime<Utc>,
    /// How many rows it holds now.
    pub held: i64,
}

impl MemberInfo {
    /// A member info with the given fields, for other backends. Not part of the stable API.
    #[doc(hidden)]
    pub fn __new(
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
