//! Mappings that customers' devices ask for (NAT-PMP, PCP, UPnP IGD). Each is a reservation,
//! made and checked like any other (policy, quota, conflicts, store, maps, audit), and found
//! again by who asked and for which internal port, so that a renewal (or a restart of
//! `pf serve`) keeps its port and touches only its expiry.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{ApiError, Engine, duration_ms};
use crate::{
    domain::spec::{PortRange, Protocols, PublicSpec, Reservation, TargetSpec},
    kernel::host::{Listening, LocalAddresses},
    service::{
        config::PortMappingConfig,
        policy::Refusal,
        store::{Mapping, MappingProtocol, NewRecord},
    },
};

/// The rules a mapping refusal names beyond the policy's: a mapping that is another's (another
/// client's, another nonce's, or a reservation the provider made), and PREFER_FAILURE's.
pub const NOT_YOURS: &str = "port_mapping.not_yours";
pub const SUGGESTION_TAKEN: &str = "port_mapping.prefer_failure";
pub const NOT_A_CLIENT: &str = "port_mapping.client";
pub const NO_SUCH_MAPPING: &str = "port_mapping.no_such_mapping";

/// A mapping request, whichever protocol carried it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapRequest {
    pub via: MappingProtocol,
    /// The datagram's (or connection's) source: the tunnel client.
    pub client: Ipv4Addr,
    /// TCP or UDP.
    pub protocol: Protocols,
    /// The port on the client. 0 with a lifetime: NAT-PMP's "forward the external port to the
    /// same port" (ProtonVPN's loop asks that way); 0 without: every mapping of the client
    /// for the protocol (of this nonce, for PCP).
    pub internal_port: u16,
    /// 0: none.
    pub suggested_port: u16,
    pub suggested_addr: Option<Ipv4Addr>,
    /// Seconds; 0 deletes.
    pub lifetime_s: u32,
    pub nonce: Option<[u8; 12]>,
    /// The suggested endpoint or nothing (PCP's PREFER_FAILURE).
    pub prefer_failure: bool,
    /// What the device called it (UPnP's NewPortMappingDescription); shown as the note.
    pub description: Option<String>,
    /// With lifetime 0: delete the client's mapping on this external port (UPnP's
    /// DeletePortMapping names the external side) instead of by internal port.
    pub delete_external: Option<u16>,
}

impl MapRequest {
    /// `client`'s request through `via` for (`protocol`, `internal_port`) for `lifetime_s`
    /// seconds, with no suggestion, nonce, description or preference: each protocol sets what
    /// it carries on top.
    pub fn new(
        via: MappingProtocol,
        client: Ipv4Addr,
        protocol: Protocols,
        internal_port: u16,
        lifetime_s: u32,
    ) -> Self {
        Self {
            via,
            client,
            protocol,
            internal_port,
            suggested_port: 0,
            suggested_addr: None,
            lifetime_s,
            nonce: None,
            prefer_failure: false,
            description: None,
            delete_external: None,
        }
    }
}

/// What a mapping request did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapAnswer {
    pub public_ip: Ipv4Addr,
    /// The mapped port; 0 for a deletion.
    pub external_port: u16,
    /// Seconds granted; 0 for a deletion.
    pub lifetime_s: u32,
    /// The reservation, when one was made or renewed.
    pub id: Option<u64>,
    /// An existing mapping's expiry moved; nothing else changed.
    pub renewed: bool,
    /// Reservations a deletion released.
    pub deleted: Vec<u64>,
}

fn refuse(rule: &'static str, detail: String) -> ApiError {
    ApiError::from(Refusal { rule, detail })
}

impl Engine {
    /// Makes, renews or deletes a mapping. Refusals carry the rule that refused them, which
    /// each protocol turns into its result code.
    pub(super) fn map(&mut self, req: MapRequest) -> Result<MapAnswer, ApiError> {
        let Some(config) = self.port_mapping.clone() else {
            return Err(refuse(
                NOT_A_CLIENT,
                "port mapping is not configured ([port_mapping])".into(),
            ));
        };
        if !self
            .policy
            .target_networks
            .iter()
            .any(|n| n.contains(req.client))
        {
            return Err(refuse(
                NOT_A_CLIENT,
                format!("{} is outside the tunnel networks", req.client),
            ));
        }
        if req.lifetime_s == 0 {
            return self.delete_mappings(&config, &req);
        }
        let lifetime = self.granted_lifetime(&config, req.lifetime_s);
        let owner = self.tunnel_owner(req.client)?;
        if let Some((id, mapping)) =
            self.store
                .mapping(req.client, req.protocol, req.internal_port)?
        {
            let record = self.get(id)?;
            if record.reservation.target_addr != req.client {
                // Moved elsewhere by the provider: not the device's any more.
                self.store.forget_mapping(id)?;
            } else if record.owner == owner {
                self.policy.check_renewal()?;
                return self.renew_mapping(id, &mapping, &req, lifetime);
            } else {
                // The address changed hands (the config's owners changed since): the old
                // owner's mapping goes, and one is made for the owner in force.
                Self::check_mapping_owner(id, &mapping, &req)?;
                self.release(id)?;
            }
        }
        self.policy.check_new()?;
        let public_addr = match req.suggested_addr {
            Some(a) if self.policy.public_ips.contains(&a) => a,
            Some(a) if req.prefer_failure && !a.is_unspecified() => {
                return Err(refuse(
                    SUGGESTION_TAKEN,
                    format!("{a} is not a public IP of this server"),
                ));
            }
            _ => config.public_ip,
        };
        // Read once: every candidate port and the final check see the same sockets and
        // addresses.
        let listening = self.listening();
        let local = super::local_addresses()?;
        let reservation = self.choose_port(&req, &owner, public_addr, &listening, &local)?;
        self.admit_with(&owner, &reservation, &listening, &local)?;
        let now = self.now_ms();
        let ttl_ms = duration_ms(std::time::Duration::from_secs(u64::from(lifetime)));
        // A device's description is kept as the note if it is one the API would take (no
        // invisible or reordering characters to dress up `pf list`).
        let note = match &req.description {
            Some(d) if !d.is_empty() && super::check_note(d).is_ok() => d.clone(),
            _ => format!("{} mapping for {}", req.via.as_str(), req.client),
        };
        let new = NewRecord {
            owner,
            reservation,
            created_ms: now,
            ttl_ms: Some(ttl_ms),
            expires_ms: Some(now.saturating_add(ttl_ms)),
            enabled: true,
            note,
        };
        let mapping = Mapping {
            via: req.via,
            client: req.client,
            protocol: req.protocol,
            internal_port: req.internal_port,
            nonce: req.nonce,
        };
        // A device's mapping gets its owner's limits, as any reservation.
        let limits = self.new_limits(&new.owner, None)?;
        let extras = super::Extras {
            mapping: Some(&mapping),
            limits: limits.as_ref(),
            ..super::Extras::default()
        };
        let record = self.commit_new(&new, extras)?;
        Ok(MapAnswer {
            public_ip: reservation.public.addr,
            external_port: reservation.public.ports.first,
            lifetime_s: lifetime,
            id: Some(record.id),
            renewed: false,
            deleted: Vec::new(),
        })
    }

    /// Who owns `client`'s mappings: the API's word, else the config's, else `tunnel:<ip>`.
    fn tunnel_owner(&self, client: Ipv4Addr) -> Result<String, ApiError> {
        Ok(match self.store.tunnel_owner(client)? {
            Some(owner) => owner,
            None => match &self.port_mapping {
                Some(config) => config.owner_of(client),
                None => format!("tunnel:{client}"),
            },
        })
    }

    /// Gives `address`'s mappings to `owner` (`None`: the config decides again). Mappings the
    /// address holds under another owner are released: they were asked for by a device of
    /// the customer the address belonged to before, and a new customer must not inherit
    /// them (their peers would reach the new customer's device).
    pub(super) fn set_tunnel_owner(
        &mut self,
        address: Ipv4Addr,
        owner: Option<String>,
    ) -> Result<serde_json::Value, ApiError> {
        if let Some(owner) = &owner {
            super::check_owner(owner)?;
        }
        if !self
            .policy
            .target_networks
            .iter()
            .any(|n| n.contains(address))
        {
            return Err(refuse(
                "policy.target_networks",
                format!("{address} is outside the tunnel networks"),
            ));
        }
        self.store.set_tunnel_owner(address, owner.as_deref())?;
        let now = self.tunnel_owner(address)?;
        let mut released = Vec::new();
        for (id, _) in self.store.client_mappings(address)? {
            if self.get(id)?.owner != now {
                self.release(id)?;
                released.push(id);
            }
        }
        Ok(serde_json::json!({
            "address": address.to_string(),
            "owner": now,
            "released": released,
        }))
    }

    /// The lifetime asked for, clamped to `[port_mapping]`'s range and to `policy.max_ttl`.
    fn granted_lifetime(&self, config: &PortMappingConfig, asked_s: u32) -> u32 {
        let secs = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        let mut max = secs(config.max_lifetime);
        if let Some(policy_max) = self.policy.max_ttl {
            max = max.min(secs(policy_max));
        }
        asked_s.clamp(secs(config.min_lifetime).min(max), max)
    }

    /// Whether `id`'s mapping may be changed by this request: the same client always asked
    /// (the store found it by client); PCP's nonce must match once one is set.
    fn check_mapping_owner(id: u64, mapping: &Mapping, req: &MapRequest) -> Result<(), ApiError> {
        match (mapping.nonce, req.nonce) {
            (Some(held), Some(asked)) if held != asked => Err(refuse(
                NOT_YOURS,
                format!("mapping {id} belongs to another PCP nonce"),
            )),
            (Some(_), None) => Err(refuse(
                NOT_YOURS,
                format!(
                    "mapping {id} was made with PCP and belongs to its nonce; {} cannot change it",
                    req.via.as_str()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// A renewal: the expiry moves, nothing else (the maps are not touched).
    fn renew_mapping(
        &mut self,
        id: u64,
        mapping: &Mapping,
        req: &MapRequest,
        lifetime: u32,
    ) -> Result<MapAnswer, ApiError> {
        Self::check_mapping_owner(id, mapping, req)?;
        let record = self.get(id)?;
        let port = record.reservation.public.ports.first;
        if req.prefer_failure && req.suggested_port != 0 && req.suggested_port != port {
            return Err(refuse(
                SUGGESTION_TAKEN,
                format!(
                    "{}:{}/{} is already mapped from port {port}",
                    req.client, req.internal_port, req.protocol
                ),
            ));
        }
        if !record.enabled {
            return Err(refuse(
                NOT_YOURS,
                format!("mapping {id} was disabled by the provider"),
            ));
        }
        self.refuse_violation(id, &["policy.max_ttl"])?;
        if let (None, Some(nonce)) = (mapping.nonce, req.nonce) {
            self.store.set_mapping_nonce(id, nonce)?;
        }
        self.extend(
            id,
            duration_ms(std::time::Duration::from_secs(u64::from(lifetime))),
        )?;
        Ok(MapAnswer {
            public_ip: record.reservation.public.addr,
            external_port: record.reservation.public.ports.first,
            lifetime_s: lifetime,
            id: Some(id),
            renewed: true,
            deleted: Vec::new(),
        })
    }

    /// Lifetime 0: the one mapping asked for, or (internal port 0) every mapping of the
    /// client for the protocol made by this protocol (and, for PCP, this nonce). Deleting
    /// what does not exist succeeds, as the RFCs ask.
    fn delete_mappings(
        &mut self,
        config: &PortMappingConfig,
        req: &MapRequest,
    ) -> Result<MapAnswer, ApiError> {
        let targets: Vec<(u64, Mapping)> = if let Some(external) = req.delete_external {
            let mut found = None;
            for (id, m) in self.store.client_mappings(req.client)? {
                if m.protocol == req.protocol
                    && self
                        .store
                        .get(id)?
                        .is_some_and(|r| r.reservation.public.ports.first == external)
                {
                    found = Some((id, m));
                }
            }
            let (id, m) = found.ok_or_else(|| {
                refuse(
                    NO_SUCH_MAPPING,
                    format!(
                        "{} holds no mapping on port {external}/{}",
                        req.client, req.protocol
                    ),
                )
            })?;
            Self::check_mapping_owner(id, &m, req)?;
            vec![(id, m)]
        } else if req.internal_port == 0 {
            self.store
                .client_mappings(req.client)?
                .into_iter()
                // PCP: every mapping of its nonce; NAT-PMP: its own, none a nonce owns.
                .filter(|(_, m)| {
                    m.protocol == req.protocol
                        && match req.nonce {
                            Some(_) => m.nonce == req.nonce,
                            None => m.nonce.is_none() && m.via == req.via,
                        }
                })
                .collect()
        } else {
            match self
                .store
                .mapping(req.client, req.protocol, req.internal_port)?
            {
                Some((id, m)) => {
                    Self::check_mapping_owner(id, &m, req)?;
                    vec![(id, m)]
                }
                None => Vec::new(),
            }
        };
        let mut deleted = Vec::new();
        for (id, _) in targets {
            self.release(id)?;
            deleted.push(id);
        }
        Ok(MapAnswer {
            public_ip: config.public_ip,
            external_port: 0,
            lifetime_s: 0,
            id: None,
            renewed: false,
            deleted,
        })
    }

    /// The reservation a new mapping gets. In order: the suggested external port; for
    /// internal port 0, the port the client already has for the other protocol (a torrent
    /// client listens on one port for both); otherwise the internal port itself (BitTorrent
    /// announces its own listen port, so a different one breaks it); else a random free port
    /// of the pool, free for both protocols where one is (so the other protocol can have it
    /// too). Each candidate must pass the policy and be free on both sides; the quota is
    /// checked after, by [`Engine::admit`].
    fn choose_port(
        &mut self,
        req: &MapRequest,
        owner: &str,
        addr: Ipv4Addr,
        listening: &Listening,
        local: &LocalAddresses,
    ) -> Result<Reservation, ApiError> {
        let target_port = (req.internal_port != 0).then_some(req.internal_port);
        let target = TargetSpec {
            addr: req.client,
            port: target_port,
        };
        let mut candidates = Vec::new();
        if req.suggested_port != 0 {
            candidates.push(req.suggested_port);
        }
        if req.internal_port == 0 {
            let other = match req.protocol {
                Protocols::Tcp => Protocols::Udp,
                _ => Protocols::Tcp,
            };
            if let Some((id, _)) = self.store.mapping(req.client, other, 0)?
                && let Some(r) = self.store.get(id)?
            {
                candidates.push(r.reservation.public.ports.first);
            }
        } else {
            candidates.push(req.internal_port);
        }
        for (i, port) in candidates.into_iter().enumerate() {
            let r = Reservation::new(
                PublicSpec {
                    addr,
                    ports: PortRange::single(port),
                    protocols: req.protocol,
                },
                target,
            )?;
            if self.is_free(&r, listening, local)?
                && self.quarantined_until(owner, &r.public)?.is_none()
            {
                return Ok(r);
            }
            if i == 0 && req.suggested_port != 0 && req.prefer_failure {
                return Err(refuse(
                    SUGGESTION_TAKEN,
                    format!("{addr}:{port}/{} is not available", req.protocol),
                ));
            }
        }
        // Free for both protocols first, then for this one.
        let both = self.free_port(owner, addr, Protocols::Both, target, listening);
        let r = match both {
            Ok(r) => r,
            Err(_) => self.free_port(owner, addr, req.protocol, target, listening)?,
        };
        Ok(Reservation::new(
            PublicSpec {
                protocols: req.protocol,
                ..r.public
            },
            target,
        )?)
    }

    /// Whether `r` passes the policy and overlaps nothing on either side.
    fn is_free(
        &self,
        r: &Reservation,
        listening: &Listening,
        local: &LocalAddresses,
    ) -> Result<bool, ApiError> {
        if self.policy.check(r, listening, local).is_err() {
            return Ok(false);
        }
        let public = r.public;
        Ok(self
            .store
            .public_overlap(public.addr, public.ports, public.protocols)?
            .is_none()
            && self
                .store
                .target_overlap(r.target_addr, r.target_ports(), public.protocols, None)?
                .is_none())
    }
}
