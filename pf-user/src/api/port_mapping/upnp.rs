//! UPnP IGD on the wire: the SOAP actions of WANIPConnection (version 1, and version 2's
//! AddAnyPortMapping) a device's client sends, parsed; answers, faults and the description
//! documents written. No I/O. A deliberately small reader, not a general XML parser: it
//! finds each argument's element by its local name, as clients write them (with or without a
//! namespace prefix, or empty as `<X/>`), and decodes the five predefined entities.

use std::net::Ipv4Addr;

pub const ROOT_DESCRIPTION_PATH: &str = "/rootDesc.xml";
pub const SCPD_PATH: &str = "/WANIPCn.xml";
pub const CONTROL_PATH: &str = "/ctl/IPConn";
/// WANCommonInterfaceConfig's control URL and description: miniupnpc takes a device for an
/// IGD only if its WANDevice has that service.
pub const LINK_CONTROL_PATH: &str = "/ctl/CmnIfCfg";
pub const LINK_SCPD_PATH: &str = "/WANCfg.xml";
/// A request body larger than this is refused (a SOAP action is a few hundred bytes).
pub const MAX_BODY: usize = 16 * 1024;
/// Longest description kept (it becomes the reservation's note).
pub const MAX_DESCRIPTION: usize = 256;

const SERVICE_TYPES: [&str; 3] = [
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    LINK_SERVICE_TYPE,
];
const LINK_SERVICE_TYPE: &str = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        }
    }
}

/// AddPortMapping's and AddAnyPortMapping's arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMapping {
    /// Must be empty (any remote host): pf does not filter by peer.
    pub remote_host: String,
    pub external_port: u16,
    pub protocol: Transport,
    pub internal_port: u16,
    /// Must be the requester itself.
    pub internal_client: Ipv4Addr,
    pub description: String,
    /// Seconds; 0 asks for a permanent mapping (IGD version 1).
    pub lease_duration: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    GetExternalIPAddress,
    GetStatusInfo,
    GetConnectionTypeInfo,
    /// WANCommonInterfaceConfig's: the link's type and state.
    GetCommonLinkProperties,
    AddPortMapping(NewMapping),
    AddAnyPortMapping(NewMapping),
    DeletePortMapping {
        external_port: u16,
        protocol: Transport,
    },
    GetSpecificPortMappingEntry {
        external_port: u16,
        protocol: Transport,
    },
    GetGenericPortMappingEntry {
        index: u32,
    },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::GetExternalIPAddress => "GetExternalIPAddress",
            Action::GetStatusInfo => "GetStatusInfo",
            Action::GetConnectionTypeInfo => "GetConnectionTypeInfo",
            Action::GetCommonLinkProperties => "GetCommonLinkProperties",
            Action::AddPortMapping(_) => "AddPortMapping",
            Action::AddAnyPortMapping(_) => "AddAnyPortMapping",
            Action::DeletePortMapping { .. } => "DeletePortMapping",
            Action::GetSpecificPortMappingEntry { .. } => "GetSpecificPortMappingEntry",
            Action::GetGenericPortMappingEntry { .. } => "GetGenericPortMappingEntry",
        }
    }
}

/// UPnP error codes (UPnP Device Architecture; WANIPConnection:2, section 2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    InvalidAction = 401,
    InvalidArgs = 402,
    ActionFailed = 501,
    ActionNotAuthorized = 606,
    SpecifiedArrayIndexInvalid = 713,
    NoSuchEntryInArray = 714,
    WildCardNotPermittedInExtPort = 716,
    ConflictInMappingEntry = 718,
    RemoteHostOnlySupportsWildcard = 726,
    NoPortMapsAvailable = 728,
}

impl Fault {
    pub fn description(self) -> &'static str {
        match self {
            Fault::InvalidAction => "Invalid Action",
            Fault::InvalidArgs => "Invalid Args",
            Fault::ActionFailed => "Action Failed",
            Fault::ActionNotAuthorized => "Action not authorized",
            Fault::SpecifiedArrayIndexInvalid => "SpecifiedArrayIndexInvalid",
            Fault::NoSuchEntryInArray => "NoSuchEntryInArray",
            Fault::WildCardNotPermittedInExtPort => "WildCardNotPermittedInExtPort",
            Fault::ConflictInMappingEntry => "ConflictInMappingEntry",
            Fault::RemoteHostOnlySupportsWildcard => "RemoteHostOnlySupportsWildcard",
            Fault::NoPortMapsAvailable => "NoPortMapsAvailable",
        }
    }

    /// The name counted for it.
    pub fn name(self) -> &'static str {
        match self {
            Fault::InvalidAction => "invalid_action",
            Fault::InvalidArgs => "invalid_args",
            Fault::ActionFailed => "action_failed",
            Fault::ActionNotAuthorized => "not_authorized",
            Fault::SpecifiedArrayIndexInvalid => "array_index_invalid",
            Fault::NoSuchEntryInArray => "no_such_entry",
            Fault::WildCardNotPermittedInExtPort => "wildcard_external_port",
            Fault::ConflictInMappingEntry => "conflict",
            Fault::RemoteHostOnlySupportsWildcard => "remote_host_not_wildcard",
            Fault::NoPortMapsAvailable => "no_port_maps_available",
        }
    }
}

/// The service type and action a `SOAPAction` header names (`"URN#Action"`, quoted or not).
pub fn soap_action(header: &str) -> Result<(&'static str, &str), Fault> {
    let header = header.trim().trim_matches('"');
    let (service, action) = header.split_once('#').ok_or(Fault::InvalidAction)?;
    let service = SERVICE_TYPES
        .into_iter()
        .find(|s| *s == service)
        .ok_or(Fault::InvalidAction)?;
    Ok((service, action))
}

/// Parses the action `name` from the SOAP body.
pub fn parse(name: &str, body: &[u8]) -> Result<Action, Fault> {
    let body = std::str::from_utf8(body).map_err(|_| Fault::InvalidArgs)?;
    let text = |arg: &str| element(body, arg).ok_or(Fault::InvalidArgs);
    let number = |arg: &str| -> Result<u32, Fault> {
        text(arg)?.trim().parse().map_err(|_| Fault::InvalidArgs)
    };
    let port = |arg: &str| -> Result<u16, Fault> {
        u16::try_from(number(arg)?).map_err(|_| Fault::InvalidArgs)
    };
    let protocol = || match text("NewProtocol")?.trim().to_ascii_uppercase().as_str() {
        "TCP" => Ok(Transport::Tcp),
        "UDP" => Ok(Transport::Udp),
        _ => Err(Fault::InvalidArgs),
    };
    let new_mapping = || -> Result<NewMapping, Fault> {
        let description: String = text("NewPortMappingDescription")
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_DESCRIPTION)
            .collect();
        Ok(NewMapping {
            remote_host: text("NewRemoteHost").unwrap_or_default().trim().to_string(),
            external_port: port("NewExternalPort")?,
            protocol: protocol()?,
            internal_port: port("NewInternalPort")?,
            internal_client: text("NewInternalClient")?
                .trim()
                .parse()
                .map_err(|_| Fault::InvalidArgs)?,
            description,
            lease_duration: number("NewLeaseDuration")?,
        })
    };
    Ok(match name {
        "GetExternalIPAddress" => Action::GetExternalIPAddress,
        "GetStatusInfo" => Action::GetStatusInfo,
        "GetConnectionTypeInfo" => Action::GetConnectionTypeInfo,
        "GetCommonLinkProperties" => Action::GetCommonLinkProperties,
        "AddPortMapping" => Action::AddPortMapping(new_mapping()?),
        "AddAnyPortMapping" => Action::AddAnyPortMapping(new_mapping()?),
        "DeletePortMapping" => Action::DeletePortMapping {
            external_port: port("NewExternalPort")?,
            protocol: protocol()?,
        },
        "GetSpecificPortMappingEntry" => Action::GetSpecificPortMappingEntry {
            external_port: port("NewExternalPort")?,
            protocol: protocol()?,
        },
        "GetGenericPortMappingEntry" => Action::GetGenericPortMappingEntry {
            index: number("NewPortMappingIndex")?,
        },
        _ => return Err(Fault::InvalidAction),
    })
}

/// The text of the first element whose local name is `name`: `<name>`, `<p:name attr="">`,
/// or empty for `<name/>`; `None` if there is none or it is not closed.
fn element(body: &str, name: &str) -> Option<String> {
    let mut rest = body;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let end = after.find('>')?;
        let tag = &after[..end];
        rest = &after[end + 1..];
        let (tag, empty) = match tag.strip_suffix('/') {
            Some(t) => (t, true),
            None => (tag, false),
        };
        let tag_name = tag.split(char::is_whitespace).next().unwrap_or_default();
        if tag_name.starts_with(['/', '?', '!']) {
            continue;
        }
        if tag_name.rsplit(':').next() != Some(name) {
            continue;
        }
        if empty {
            return Some(String::new());
        }
        let close = rest.find("</")?;
        return Some(unescape(&rest[..close]));
    }
    None
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Text made safe inside an XML element.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

const ENVELOPE_OPEN: &str = "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>";
const ENVELOPE_CLOSE: &str = "</s:Body></s:Envelope>\r\n";

/// An action's answer: `<u:NAMEResponse>` with each (argument, value), values escaped.
pub fn answer(service: &str, action: &str, args: &[(&str, String)]) -> String {
    let mut out = format!("{ENVELOPE_OPEN}<u:{action}Response xmlns:u=\"{service}\">");
    for (name, value) in args {
        out += &format!("<{name}>{}</{name}>", escape(value));
    }
    out += &format!("</u:{action}Response>{ENVELOPE_CLOSE}");
    out
}

/// A fault (sent with HTTP status 500).
pub fn fault(f: Fault) -> String {
    format!(
        "{ENVELOPE_OPEN}<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{}</errorCode><errorDescription>{}</errorDescription></UPnPError></detail></s:Fault>{ENVELOPE_CLOSE}",
        f as u16,
        f.description()
    )
}

/// The root description: an InternetGatewayDevice:1 holding a WANDevice holding a
/// WANConnectionDevice with the WANIPConnection:1 service. `base` is `http://ADDR:PORT`.
pub fn root_description(base: &str, uuid: &str) -> String {
    let device = |kind: &str, n: u8, inner: &str| {
        format!(
            "<device><deviceType>urn:schemas-upnp-org:device:{kind}:1</deviceType><friendlyName>pf {kind}</friendlyName><manufacturer>pf</manufacturer><modelName>pf port forwarding</modelName><UDN>uuid:{uuid}-{n}</UDN>{inner}</device>"
        )
    };
    let service = format!(
        "<serviceList><service><serviceType>{}</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>{CONTROL_PATH}</controlURL><eventSubURL>/evt/IPConn</eventSubURL><SCPDURL>{SCPD_PATH}</SCPDURL></service></serviceList>",
        SERVICE_TYPES[0]
    );
    let connection = device("WANConnectionDevice", 3, &service);
    let link = format!(
        "<serviceList><service><serviceType>{LINK_SERVICE_TYPE}</serviceType><serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId><controlURL>{LINK_CONTROL_PATH}</controlURL><eventSubURL>/evt/CmnIfCfg</eventSubURL><SCPDURL>{LINK_SCPD_PATH}</SCPDURL></service></serviceList>"
    );
    let wan = device(
        "WANDevice",
        2,
        &format!("{link}<deviceList>{connection}</deviceList>"),
    );
    let root = device(
        "InternetGatewayDevice",
        1,
        &format!("<deviceList>{wan}</deviceList>"),
    );
    format!(
        "<?xml version=\"1.0\"?>\r\n<root xmlns=\"urn:schemas-upnp-org:device-1-0\"><specVersion><major>1</major><minor>0</minor></specVersion><URLBase>{base}/</URLBase>{root}</root>\r\n"
    )
}

/// The service description (SCPD) of what pf serves of WANCommonInterfaceConfig.
pub fn link_service_description() -> String {
    let out = |name: &str, var: &str, kind: &str| {
        (
            format!(
                "<argument><name>{name}</name><direction>out</direction><relatedStateVariable>{var}</relatedStateVariable></argument>"
            ),
            format!(
                "<stateVariable sendEvents=\"no\"><name>{var}</name><dataType>{kind}</dataType></stateVariable>"
            ),
        )
    };
    let args = [
        out("NewWANAccessType", "WANAccessType", "string"),
        out(
            "NewLayer1UpstreamMaxBitRate",
            "Layer1UpstreamMaxBitRate",
            "ui4",
        ),
        out(
            "NewLayer1DownstreamMaxBitRate",
            "Layer1DownstreamMaxBitRate",
            "ui4",
        ),
        out("NewPhysicalLinkStatus", "PhysicalLinkStatus", "string"),
    ];
    let arguments: String = args.iter().map(|(a, _)| a.as_str()).collect();
    let vars: String = args.iter().map(|(_, v)| v.as_str()).collect();
    format!(
        "<?xml version=\"1.0\"?>\r\n<scpd xmlns=\"urn:schemas-upnp-org:service-1-0\"><specVersion><major>1</major><minor>0</minor></specVersion><actionList><action><name>GetCommonLinkProperties</name><argumentList>{arguments}</argumentList></action></actionList><serviceStateTable>{vars}</serviceStateTable></scpd>\r\n"
    )
}

/// The service description (SCPD) of what pf serves of WANIPConnection.
pub fn service_description() -> String {
    let arg = |name: &str, dir: &str, var: &str| {
        format!(
            "<argument><name>{name}</name><direction>{dir}</direction><relatedStateVariable>{var}</relatedStateVariable></argument>"
        )
    };
    let mapping_in = [
        arg("NewRemoteHost", "in", "RemoteHost"),
        arg("NewExternalPort", "in", "ExternalPort"),
        arg("NewProtocol", "in", "PortMappingProtocol"),
    ]
    .concat();
    let entry_out = [
        arg("NewInternalPort", "out", "InternalPort"),
        arg("NewInternalClient", "out", "InternalClient"),
        arg("NewEnabled", "out", "PortMappingEnabled"),
        arg("NewPortMappingDescription", "out", "PortMappingDescription"),
        arg("NewLeaseDuration", "out", "PortMappingLeaseDuration"),
    ]
    .concat();
    let add_in = [
        mapping_in.clone(),
        arg("NewInternalPort", "in", "InternalPort"),
        arg("NewInternalClient", "in", "InternalClient"),
        arg("NewEnabled", "in", "PortMappingEnabled"),
        arg("NewPortMappingDescription", "in", "PortMappingDescription"),
        arg("NewLeaseDuration", "in", "PortMappingLeaseDuration"),
    ]
    .concat();
    let action = |name: &str, args: &str| {
        format!("<action><name>{name}</name><argumentList>{args}</argumentList></action>")
    };
    let actions = [
        action(
            "GetExternalIPAddress",
            &arg("NewExternalIPAddress", "out", "ExternalIPAddress"),
        ),
        action(
            "GetStatusInfo",
            &[
                arg("NewConnectionStatus", "out", "ConnectionStatus"),
                arg("NewLastConnectionError", "out", "LastConnectionError"),
                arg("NewUptime", "out", "Uptime"),
            ]
            .concat(),
        ),
        action(
            "GetConnectionTypeInfo",
            &[
                arg("NewConnectionType", "out", "ConnectionType"),
                arg(
                    "NewPossibleConnectionTypes",
                    "out",
                    "PossibleConnectionTypes",
                ),
            ]
            .concat(),
        ),
        action("AddPortMapping", &add_in),
        action(
            "AddAnyPortMapping",
            &[
                add_in.clone(),
                arg("NewReservedPort", "out", "ExternalPort"),
            ]
            .concat(),
        ),
        action("DeletePortMapping", &mapping_in),
        action(
            "GetSpecificPortMappingEntry",
            &[mapping_in.clone(), entry_out.clone()].concat(),
        ),
        action(
            "GetGenericPortMappingEntry",
            &[
                arg("NewPortMappingIndex", "in", "PortMappingNumberOfEntries"),
                mapping_in.replace(">in<", ">out<"),
                entry_out,
            ]
            .concat(),
        ),
    ]
    .concat();
    let var = |name: &str, kind: &str| {
        format!(
            "<stateVariable sendEvents=\"no\"><name>{name}</name><dataType>{kind}</dataType></stateVariable>"
        )
    };
    let vars = [
        var("ExternalIPAddress", "string"),
        var("ConnectionStatus", "string"),
        var("LastConnectionError", "string"),
        var("Uptime", "ui4"),
        var("ConnectionType", "string"),
        var("PossibleConnectionTypes", "string"),
        var("RemoteHost", "string"),
        var("ExternalPort", "ui2"),
        var("PortMappingProtocol", "string"),
        var("InternalPort", "ui2"),
        var("InternalClient", "string"),
        var("PortMappingEnabled", "boolean"),
        var("PortMappingDescription", "string"),
        var("PortMappingLeaseDuration", "ui4"),
        var("PortMappingNumberOfEntries", "ui2"),
    ]
    .concat();
    format!(
        "<?xml version=\"1.0\"?>\r\n<scpd xmlns=\"urn:schemas-upnp-org:service-1-0\"><specVersion><major>1</major><minor>0</minor></specVersion><actionList>{actions}</actionList><serviceStateTable>{vars}</serviceStateTable></scpd>\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What miniupnpc sends for `upnpc -a 10.8.0.2 8080 8080 TCP 3600`.
    const ADD: &str = "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:AddPortMapping xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:1\"><NewRemoteHost></NewRemoteHost><NewExternalPort>8080</NewExternalPort><NewProtocol>TCP</NewProtocol><NewInternalPort>8080</NewInternalPort><NewInternalClient>10.8.0.2</NewInternalClient><NewEnabled>1</NewEnabled><NewPortMappingDescription>libminiupnpc &amp; co</NewPortMappingDescription><NewLeaseDuration>3600</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>\r\n";

    #[test]
    fn miniupnpc_s_add_port_mapping_parses() {
        let (service, name) =
            soap_action("\"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping\"")
                .unwrap();
        assert_eq!(service, SERVICE_TYPES[0]);
        let Action::AddPortMapping(m) = parse(name, ADD.as_bytes()).unwrap() else {
            panic!("not AddPortMapping")
        };
        assert_eq!(
            m,
            NewMapping {
                remote_host: String::new(),
                external_port: 8080,
                protocol: Transport::Tcp,
                internal_port: 8080,
                internal_client: Ipv4Addr::new(10, 8, 0, 2),
                description: "libminiupnpc & co".into(),
                lease_duration: 3600,
            }
        );
        assert_eq!(
            parse(
                "GetGenericPortMappingEntry",
                b"<a><m:NewPortMappingIndex>3</m:NewPortMappingIndex></a>"
            ),
            Ok(Action::GetGenericPortMappingEntry { index: 3 })
        );
        assert_eq!(
            element("<x><NewRemoteHost/><y>1</y></x>", "NewRemoteHost"),
            Some(String::new())
        );
    }

    #[test]
    fn bad_actions_and_arguments_get_their_faults() {
        assert_eq!(
            soap_action("urn:x#AddPortMapping"),
            Err(Fault::InvalidAction)
        );
        assert_eq!(parse("Reboot", b""), Err(Fault::InvalidAction));
        assert_eq!(
            parse(
                "AddPortMapping",
                ADD.replace(">8080<", ">80800<").as_bytes()
            ),
            Err(Fault::InvalidArgs)
        );
        assert_eq!(
            parse(
                "DeletePortMapping",
                b"<NewExternalPort>1</NewExternalPort><NewProtocol>SCTP</NewProtocol>"
            ),
            Err(Fault::InvalidArgs)
        );
        assert_eq!(
            parse("AddPortMapping", &[0xff, 0xfe]),
            Err(Fault::InvalidArgs)
        );
        let f = fault(Fault::ConflictInMappingEntry);
        assert!(f.contains("<errorCode>718</errorCode>"));
        let a = answer(
            SERVICE_TYPES[0],
            "GetExternalIPAddress",
            &[("NewExternalIPAddress", "<&>".into())],
        );
        assert!(a.contains("<NewExternalIPAddress>&lt;&amp;&gt;</NewExternalIPAddress>"));
    }

    #[test]
    fn random_and_mutated_bodies_never_panic() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(0x1900);
        let names = [
            "AddPortMapping",
            "AddAnyPortMapping",
            "DeletePortMapping",
            "GetSpecificPortMappingEntry",
            "GetGenericPortMappingEntry",
        ];
        for _ in 0..20_000 {
            let mut body = ADD.as_bytes().to_vec();
            for _ in 0..rng.random_range(1..8) {
                match rng.random_range(0..4) {
                    0 if !body.is_empty() => {
                        let at = rng.random_range(0..body.len());
                        body[at] =
                            [b'<', b'>', b'/', b':', b'&', rng.random()][rng.random_range(0..6)];
                    }
                    1 => body.truncate(rng.random_range(0..=body.len())),
                    2 if !body.is_empty() => {
                        let at = rng.random_range(0..body.len());
                        body.drain(at..(at + rng.random_range(0..40)).min(body.len()));
                    }
                    _ => body.extend((0..rng.random_range(0..30)).map(|_| rng.random::<u8>())),
                }
            }
            let _ = parse(names[rng.random_range(0..names.len())], &body);
        }
    }
}
