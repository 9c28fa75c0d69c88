//! The statuses of milo's bots and slots, and the moves the workers may make between them.
//!
//! milo writes statuses as plain strings. Anything the worker does not recognise is kept as
//! [`BotStatus::Unknown`] / [`SlotStatus::Unknown`] rather than rejected, so that a newer milo
//! with a status this build has never heard of is left alone instead of crashing a run.

use std::fmt;

/// A bot's lifecycle, in the order milo moves through it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BotStatus {
    ReadyToDeploy,
    Queued,
    Deploying,
    JoiningCall,
    InWaitingRoom,
    InCall,
    Leaving,
    CallEnded,
    Done,
    Fatal,
    Unknown(String),
}

/// Statuses in which a bot must be heartbeating; BotHealth watches exactly these.
/// DEPLOYING is deliberately absent: a deploying bot belongs to SlotRecovery.
pub const HEARTBEAT_STATUSES: [&str; 4] = ["JOINING_CALL", "IN_WAITING_ROOM", "IN_CALL", "LEAVING"];

impl BotStatus {
    /// Every status this build knows, in lifecycle order.
    pub const KNOWN: [BotStatus; 10] = [
        Self::ReadyToDeploy,
        Self::Queued,
        Self::Deploying,
        Self::JoiningCall,
        Self::InWaitingRoom,
        Self::InCall,
        Self::Leaving,
        Self::CallEnded,
        Self::Done,
        Self::Fatal,
    ];

    /// The statuses a worker may mark FATAL, as the guard of every FATAL write uses them.
    pub fn fatal_allowed_from() -> Vec<&'static str> {
        Self::KNOWN
            .iter()
            .filter(|s| s.worker_may_move_to(&Self::Fatal))
            .map(|s| s.as_static_str())
            .collect()
    }

    fn as_static_str(&self) -> &'static str {
        match self {
            Self::ReadyToDeploy => "READY_TO_DEPLOY",
            Self::Queued => "QUEUED",
            Self::Deploying => "DEPLOYING",
            Self::JoiningCall => "JOINING_CALL",
            Self::InWaitingRoom => "IN_WAITING_ROOM",
            Self::InCall => "IN_CALL",
            Self::Leaving => "LEAVING",
            Self::CallEnded => "CALL_ENDED",
            Self::Done => "DONE",
            Self::Fatal => "FATAL",
            Self::Unknown(_) => "",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "READY_TO_DEPLOY" => Self::ReadyToDeploy,
            "QUEUED" => Self::Queued,
            "DEPLOYING" => Self::Deploying,
            "JOINING_CALL" => Self::JoiningCall,
            "IN_WAITING_ROOM" => Self::InWaitingRoom,
            "IN_CALL" => Self::InCall,
            "LEAVING" => Self::Leaving,
            "CALL_ENDED" => Self::CallEnded,
            "DONE" => Self::Done,
            "FATAL" => Self::Fatal,
            other => Self::Unknown(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Unknown(s) => s,
            known => known.as_static_str(),
        }
    }

    /// DONE and FATAL are final: no worker ever moves a bot out of them.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Done | Self::Fatal)
    }

    /// Must be heartbeating (see [`HEARTBEAT_STATUSES`]).
    pub fn needs_heartbeat(&self) -> bool {
        HEARTBEAT_STATUSES.contains(&self.as_str())
    }

    /// Deployed and running: the bot got past DEPLOYING and has not finished. A deploying
    /// slot whose bot is in one of these is really busy.
    pub fn is_past_deploying(&self) -> bool {
        self.needs_heartbeat() || matches!(self, Self::CallEnded)
    }

    /// Whether a worker may move a bot from `self` to `to`. The workers only ever write FATAL,
    /// and only over a status that is neither terminal nor unknown to this build.
    pub fn worker_may_move_to(&self, to: &BotStatus) -> bool {
        *to == Self::Fatal && !self.is_terminal() && !matches!(self, Self::Unknown(_))
    }
}

impl fmt::Display for BotStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pool slot's state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SlotStatus {
    Idle,
    Deploying,
    Busy,
    Error,
    Unknown(String),
}

impl SlotStatus {
    pub fn parse(s: &str) -> Self {
        match s {
            "idle" => Self::Idle,
            "deploying" => Self::Deploying,
            "busy" => Self::Busy,
            "error" => Self::Error,
            other => Self::Unknown(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Idle => "idle",
            Self::Deploying => "deploying",
            Self::Busy => "busy",
            Self::Error => "error",
            Self::Unknown(s) => s,
        }
    }

    /// Whether a worker may move a slot from `self` to `to` (deletion is not a status and is
    /// governed by the recovery attempt count instead).
    pub fn worker_may_move_to(&self, to: &SlotStatus) -> bool {
        use SlotStatus::*;
        matches!(
            (self, to),
            (Error, Idle)
                | (Error, Error)
                | (Deploying, Idle)
                | (Deploying, Error)
                | (Deploying, Busy)
                | (Busy, Idle)
                | (Busy, Error)
        )
    }
}

impl fmt::Display for SlotStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_BOTS: [&str; 10] = [
        "READY_TO_DEPLOY",
        "QUEUED",
        "DEPLOYING",
        "JOINING_CALL",
        "IN_WAITING_ROOM",
        "IN_CALL",
        "LEAVING",
        "CALL_ENDED",
        "DONE",
        "FATAL",
    ];

    #[test]
    fn every_known_bot_status_round_trips() {
        for s in ALL_BOTS {
            let parsed = BotStatus::parse(s);
            assert!(
                !matches!(parsed, BotStatus::Unknown(_)),
                "{s} should be known"
            );
            assert_eq!(parsed.as_str(), s);
        }
    }

    #[test]
    fn workers_never_move_a_bot_out_of_done_or_fatal() {
        for s in ["DONE", "FATAL"] {
            assert!(!BotStatus::parse(s).worker_may_move_to(&BotStatus::Fatal));
        }
        assert!(BotStatus::parse("IN_CALL").worker_may_move_to(&BotStatus::Fatal));
        assert!(!BotStatus::parse("IN_CALL").worker_may_move_to(&BotStatus::Done));
    }

    #[test]
    fn fatal_is_allowed_from_every_known_non_terminal_status() {
        let allowed = BotStatus::fatal_allowed_from();
        assert_eq!(allowed.len(), 8);
        assert!(!allowed.contains(&"DONE") && !allowed.contains(&"FATAL"));
    }

    #[test]
    fn deploying_bots_are_not_heartbeat_watched() {
        assert!(!BotStatus::Deploying.needs_heartbeat());
        assert!(BotStatus::InCall.needs_heartbeat());
    }

    #[test]
    fn unknown_statuses_are_kept_and_left_alone() {
        let s = BotStatus::parse("HIBERNATING");
        assert_eq!(s.as_str(), "HIBERNATING");
        assert!(!s.worker_may_move_to(&BotStatus::Fatal));
        assert!(!SlotStatus::parse("paused").worker_may_move_to(&SlotStatus::Idle));
    }
}
