//! What each protocol answers for what the engine did: its result codes for the engine's
//! refusals (by the rule that refused), and its answer layout.

use crate::{
    api::port_mapping::{natpmp, pcp},
    service::engine::{ApiError, Failure, mapping},
};

/// How a refusal reads in the protocols' terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The owner's quota (`policy.ports_per_owner`).
    Quota,
    /// No port left, or the client asks too fast.
    NoResources,
    /// PREFER_FAILURE and the suggestion is taken.
    SuggestionTaken,
    /// The store or the audit log cannot take changes, or the engine failed.
    Unavailable,
    /// Everything else: the policy, another's mapping, a conflict.
    NotAuthorized,
}

impl Refused {
    pub fn of(e: &ApiError) -> Self {
        match (e.kind, e.rule) {
            (Failure::Unavailable | Failure::Internal, _) => Refused::Unavailable,
            (_, Some("policy.ports_per_owner")) => Refused::Quota,
            (_, Some("policy.port_pool")) => Refused::NoResources,
            (_, Some(mapping::SUGGESTION_TAKEN)) => Refused::SuggestionTaken,
            _ => Refused::NotAuthorized,
        }
    }

    pub fn natpmp(self) -> natpmp::ResultCode {
        match self {
            Refused::Quota | Refused::NoResources => natpmp::ResultCode::OutOfResources,
            Refused::Unavailable => natpmp::ResultCode::NetworkFailure,
            Refused::SuggestionTaken | Refused::NotAuthorized => natpmp::ResultCode::NotAuthorized,
        }
    }

    pub fn pcp(self) -> pcp::ResultCode {
        match self {
            Refused::Quota => pcp::ResultCode::UserExQuota,
            Refused::NoResources => pcp::ResultCode::NoResources,
            Refused::SuggestionTaken => pcp::ResultCode::CannotProvideExternal,
            Refused::Unavailable => pcp::ResultCode::NetworkFailure,
            Refused::NotAuthorized => pcp::ResultCode::NotAuthorized,
        }
    }
}

/// NAT-PMP's names for its result codes, as counted.
pub fn natpmp_name(r: natpmp::ResultCode) -> &'static str {
    match r {
        natpmp::ResultCode::Success => "success",
        natpmp::ResultCode::UnsupportedVersion => "unsupported_version",
        natpmp::ResultCode::NotAuthorized => "not_authorized",
        natpmp::ResultCode::NetworkFailure => "network_failure",
        natpmp::ResultCode::OutOfResources => "out_of_resources",
        natpmp::ResultCode::UnsupportedOpcode => "unsupported_opcode",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::policy::Refusal;

    #[test]
    fn refusals_map_to_each_protocol_s_codes() {
        let by_rule = |rule| {
            Refused::of(&ApiError::from(Refusal {
                rule,
                detail: String::new(),
            }))
        };
        assert_eq!(
            by_rule("policy.ports_per_owner").natpmp(),
            natpmp::ResultCode::OutOfResources
        );
        assert_eq!(
            by_rule("policy.ports_per_owner").pcp(),
            pcp::ResultCode::UserExQuota
        );
        assert_eq!(
            by_rule("policy.port_pool").pcp(),
            pcp::ResultCode::NoResources
        );
        assert_eq!(
            by_rule(mapping::NOT_YOURS).natpmp(),
            natpmp::ResultCode::NotAuthorized
        );
        assert_eq!(
            by_rule(mapping::SUGGESTION_TAKEN).pcp(),
            pcp::ResultCode::CannotProvideExternal
        );
        assert_eq!(
            Refused::of(&ApiError::unavailable("full disk")).natpmp(),
            natpmp::ResultCode::NetworkFailure
        );
    }
}
