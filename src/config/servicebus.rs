//! `[servicebus]`: Azure Service Bus over AMQP 1.0. The connection string holds the shared
//! access key: it is parsed here (an error names the key and the problem, never the string)
//! and the key is kept in a [`Secret`] that no `Debug` or log line shows.

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::secret::Secret;
use crate::topic::TopicTemplate;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServiceBus {
    pub(super) connection_string: Option<String>,
    queue: Option<String>,
    dead_letter_queue: Option<String>,
    sessions: Option<bool>,
    max_message_bytes: Option<usize>,
}

/// `[servicebus]` (`Debug` shows no key).
#[derive(Clone)]
pub struct ServiceBusConfig {
    /// `amqps://host:5671` (from `sb://host/`), or `amqp://host:port` for a local broker or the
    /// Service Bus emulator (`UseDevelopmentEmulator=true`).
    pub url: String,
    /// `SharedAccessKeyName`: the SASL PLAIN user.
    pub key_name: String,
    /// `SharedAccessKey`: the SASL PLAIN password.
    pub key: Secret,
    /// Queue or topic template (`{aggregatetype}`, `{type}`); `EntityPath` of the connection
    /// string when the template is unset.
    pub queue: String,
    /// The queue poison events go to, with their reason as application properties.
    pub dead_letter_queue: String,
    /// `session-id` (AMQP `group-id`) = aggregate id: a session receiver gets one aggregate's
    /// messages in order.
    pub sessions: bool,
    /// A message's limit (body and properties): 262,144 on the Standard tier.
    pub max_message_bytes: usize,
}

impl std::fmt::Debug for ServiceBusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusConfig")
            .field("url", &self.url)
            .field("key_name", &self.key_name)
            .field("key", &self.key)
            .field("queue", &self.queue)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("sessions", &self.sessions)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

/// The parts of a connection string the relay uses.
#[derive(Debug, PartialEq)]
pub struct ConnectionString {
    pub url: String,
    pub key_name: String,
    pub key: String,
    pub entity_path: Option<String>,
}

/// Parses `Endpoint=sb://NS.servicebus.windows.net/;SharedAccessKeyName=N;SharedAccessKey=K[;EntityPath=Q]`
/// (keys in any case and order; a value may hold `=`). `Err` never contains the string.
pub fn parse_connection_string(text: &str) -> Result<ConnectionString, String> {
    let mut endpoint = None;
    let (mut key_name, mut key, mut entity_path, mut emulator) = (None, None, None, false);
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, value)) = part.split_once('=') else {
            return Err("a part without `=` (expected Name=Value pairs separated by `;`)".into());
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "endpoint" => endpoint = Some(value.trim().to_string()),
            "sharedaccesskeyname" => key_name = Some(value.to_string()),
            "sharedaccesskey" => key = Some(value.to_string()),
            "entitypath" => entity_path = Some(value.to_string()).filter(|v| !v.is_empty()),
            "usedevelopmentemulator" => emulator = value.trim().eq_ignore_ascii_case("true"),
            "sharedaccesssignature" => {
                return Err("a SharedAccessSignature is not supported yet (it needs AMQP claims-based security); use SharedAccessKeyName and SharedAccessKey".into())
            }
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or("no Endpoint")?;
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or("Endpoint is not a URL (sb://NAMESPACE.servicebus.windows.net/)")?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err("Endpoint has no host".into());
    }
    let with_port = |default: u16| {
        if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:{default}")
        }
    };
    let url = match scheme.to_ascii_lowercase().as_str() {
        "sb" if emulator => format!("amqp://{}", with_port(5672)),
        "sb" | "amqps" => format!("amqps://{}", with_port(5671)),
        "amqp" => format!("amqp://{}", with_port(5672)),
        other => {
            return Err(format!(
                "Endpoint scheme `{other}` is not sb://, amqps:// or amqp://"
            ))
        }
    };
    Ok(ConnectionString {
        url,
        key_name: key_name
            .filter(|k| !k.is_empty())
            .ok_or("no SharedAccessKeyName")?,
        key: key.filter(|k| !k.is_empty()).ok_or("no SharedAccessKey")?,
        entity_path,
    })
}

pub(super) fn servicebus(raw: RawServiceBus, used: bool) -> Result<ServiceBusConfig, ConfigError> {
    const KEY: &str = "servicebus.connection_string";
    let parsed = match (raw.connection_string, used) {
        (Some(t), true) => Some(parse_connection_string(&t).map_err(|p| invalid(KEY, p))?),
        (None, true) => {
            return Err(invalid(
                KEY,
                "missing; set it or OUTBOXD_SERVICEBUS_CONNECTION_STRING (Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…)",
            ))
        }
        _ => None,
    };
    let entity = parsed.as_ref().and_then(|p| p.entity_path.clone());
    let queue = raw
        .queue
        .or(entity)
        .unwrap_or_else(|| "outbox-{aggregatetype}".into());
    TopicTemplate::parse(&queue).map_err(|p| invalid("servicebus.queue", p))?;
    let dead_letter_queue = raw
        .dead_letter_queue
        .unwrap_or_else(|| "outboxd-dead-letter".into());
    if let Err(p) = crate::topic::Naming::ServiceBusEntity.check(&dead_letter_queue) {
        return Err(invalid("servicebus.dead_letter_queue", p));
    }
    let max = raw.max_message_bytes.unwrap_or(262_144);
    if !(1_024..=104_857_600).contains(&max) {
        return Err(invalid(
            "servicebus.max_message_bytes",
            "must be between 1024 and 104857600 (Premium's largest message; Standard takes 262144)",
        ));
    }
    let (url, key_name, key) = match parsed {
        Some(p) => (p.url, p.key_name, p.key),
        None => Default::default(),
    };
    Ok(ServiceBusConfig {
        url,
        key_name,
        key: Secret::new(key),
        queue,
        dead_letter_queue,
        sessions: raw.sessions.unwrap_or(true),
        max_message_bytes: max,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The shape of the Azure portal's connection strings (a made-up key).
    #[test]
    fn a_portal_connection_string_parses_into_amqps_and_the_key() {
        let c = parse_connection_string(
            "Endpoint=sb://shop.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=k3y+/Abc=;EntityPath=orders",
        )
        .unwrap();
        assert_eq!(c.url, "amqps://shop.servicebus.windows.net:5671");
        assert_eq!(c.key_name, "RootManageSharedAccessKey");
        assert_eq!(c.key, "k3y+/Abc=");
        assert_eq!(c.entity_path.as_deref(), Some("orders"));
        let emulator = parse_connection_string(
            "Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
        )
        .unwrap();
        assert_eq!(emulator.url, "amqp://localhost:5672");
        let local = parse_connection_string(
            "endpoint=amqp://127.0.0.1:25672/;sharedaccesskeyname=u;sharedaccesskey=p",
        )
        .unwrap();
        assert_eq!(local.url, "amqp://127.0.0.1:25672");
    }

    #[test]
    fn a_bad_connection_string_says_why_without_echoing_the_key() {
        for (text, says) in [
            (
                "SharedAccessKeyName=n;SharedAccessKey=s3cr3t",
                "no Endpoint",
            ),
            (
                "Endpoint=sb://ns/;SharedAccessKey=s3cr3t",
                "no SharedAccessKeyName",
            ),
            (
                "Endpoint=sb://ns/;SharedAccessKeyName=n",
                "no SharedAccessKey",
            ),
            (
                "Endpoint=http://ns/;SharedAccessKeyName=n;SharedAccessKey=s3cr3t",
                "scheme `http`",
            ),
            (
                "Endpoint=sb://ns/;SharedAccessSignature=SharedAccessSignature sr=x&sig=s3cr3t",
                "not supported",
            ),
            ("Endpoint=sb://ns/;s3cr3t", "without `=`"),
        ] {
            let e = parse_connection_string(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
        use crate::topic::valid_servicebus_entity as valid;
        assert!(valid("orders/subscriptions-x") && !valid("-x") && !valid(""));
    }
}
