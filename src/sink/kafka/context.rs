//! librdkafka's logs and global errors, into `tracing`; and which of those errors no retry
//! can mend (a refused password, an untrusted certificate: exit code 2 at start).

use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::error::Error;

/// Routes librdkafka's log lines and global errors into `tracing`, and remembers the last
/// global error: a metadata request that times out says nothing of *why* (a refused password,
/// an untrusted certificate); that error does.
#[derive(Clone, Default)]
pub struct LogContext {
    pub(super) last_error: Arc<Mutex<Option<ClientError>>>,
}

impl rdkafka::consumer::ConsumerContext for LogContext {}

/// librdkafka's code and reason for a global client error.
type ClientError = (Option<RDKafkaErrorCode>, String);

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{msg}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{msg}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{msg}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{msg}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker connection failures land here; librdkafka keeps reconnecting by itself.
        tracing::warn!(target: "librdkafka", error = %error, "kafka client error: {reason}");
        let code = error.rdkafka_error_code();
        // "All brokers down" follows every failed connection; the reason is the error before.
        if code != Some(RDKafkaErrorCode::AllBrokersDown) {
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some((code, reason.to_string()));
            }
        }
    }
}

/// A client error that no retry can mend: the broker refused our credentials, or we do not
/// trust its certificate. librdkafka's reason names neither password nor key material.
pub(super) fn unusable_credentials(code: Option<RDKafkaErrorCode>, reason: &str) -> Option<Error> {
    if code == Some(RDKafkaErrorCode::Authentication) || reason.contains("SASL authentication") {
        return Some(Error::setup(
            format!("kafka refused the authentication: {reason}"),
            "check sasl.username, sasl.password and sasl.mechanisms in [kafka.properties]",
        ));
    }
    if reason.contains("certificate verify failed") || reason.contains("certificate") {
        return Some(Error::setup(
            format!("the broker's TLS certificate is not trusted: {reason}"),
            "point ssl.ca.location in [kafka.properties] at the CA that signed the broker's certificate (and check the broker address matches it)",
        ));
    }
    None
}

/// A librdkafka configuration error without the property's value: the value may be a secret
/// (a mistyped `sasl.pasword` is an unknown property whose value is the password), and
/// rdkafka's `Display` prints it.
pub fn config_error(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) => {
            let desc = if value.is_empty() {
                desc.clone()
            } else {
                desc.replace(value.as_str(), "***")
            };
            format!("{desc} (kafka.properties \"{key}\"; its value is not shown)")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaConfRes;

    #[test]
    fn a_configuration_error_never_shows_the_value() {
        let e = KafkaError::ClientConfig(
            RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
            "No such configuration property: \"sasl.pasword\"".into(),
            "sasl.pasword".into(),
            "hunter2-secret".into(),
        );
        let line = config_error(&e);
        assert!(!line.contains("hunter2"), "{line}");
        assert!(line.contains("sasl.pasword"), "{line}");
        let e = KafkaError::ClientConfig(
            RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Configuration property \"sasl.password\" value hunter2-secret is invalid".into(),
            "sasl.password".into(),
            "hunter2-secret".into(),
        );
        assert!(!config_error(&e).contains("hunter2"));
    }
}
