//! What a service is, in one value: its name, its tables, the topics it consumes and the
//! routes it offers to clients. Each service crate exports one [`ServiceSpec`]; the binary's
//! role table lists them, and everything that iterates roles (the supervisor, the audit, the
//! gateway's default config, the runtime's consumer check) reads the same value.

use crate::store::Migration;

/// A service of the system as the tools that start, route to and audit it see it.
#[derive(Debug)]
pub struct ServiceSpec {
    /// The role's name: event source, consumer group, log prefix, store file name.
    pub name: &'static str,
    /// The service's own tables, applied in version order with the kit's (outbox and inbox
    /// 1 and 3, the saga's 2): a service numbers its own from 10.
    pub migrations: &'static [Migration],
    /// Topics it publishes to (through its outbox): the broker lets it publish to these
    /// and no others.
    pub publishes: &'static [&'static str],
    /// Topics it consumes, each as consumer group [`ServiceSpec::name`].
    pub consumes: &'static [&'static str],
    /// What clients may call through the gateway.
    pub routes: &'static [PublicRoute],
    /// The operations its API serves, declared where they are routed (see
    /// [`crate::openapi`]); [`crate::openapi::service_document`] finishes them.
    pub openapi: fn() -> utoipa::openapi::OpenApi,
    /// Every message type of the system with its schema: what the role's consumers hold
    /// incoming payloads to (see [`crate::asyncapi`]).
    pub messages: &'static [bazaar_core::message::MessageSpec],
    /// The metrics it records beside the kit's, each with its help text.
    pub metrics: &'static [crate::telemetry::MetricDoc],
}

/// One resource a service serves to clients, as the gateway exposes it (under `/api/v1`,
/// or at its root for well-known documents).
#[derive(Debug)]
pub struct PublicRoute {
    /// The gateway route's name, unique across services.
    pub name: &'static str,
    /// The first path segment: `/api/v1/<resource>` reaches `/<resource>` on the service.
    pub resource: &'static str,
    /// Where the gateway mounts it.
    pub mount: Mount,
    /// Methods this route matches; empty matches every method.
    pub methods: &'static [&'static str],
    /// Matches `/api/v1/<resource>` only, not paths below it (registration, say).
    pub exact: bool,
    /// Who may call it.
    pub access: Access,
}

/// Where the gateway serves a public route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mount {
    /// `/api/v1/<resource>`: the versioned API.
    Api,
    /// `/<resource>` at the gateway's root: documents whose place a standard fixes, such as
    /// `/.well-known/jwks.json`.
    Root,
}

impl Mount {
    /// The gateway path prefix before `/<resource>`.
    pub fn prefix(self) -> &'static str {
        match self {
            Mount::Api => "/api/v1",
            Mount::Root => "",
        }
    }
}

/// Who may call a public route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token (registration, login, browsing the catalogue).
    Anyone,
    /// A bearer token the gateway verifies; the service checks roles and ownership.
    Token,
    /// Anyone, but each call checks a password or opens an account (sign-in, registration):
    /// the gateway limits it per client far more strictly than the rest.
    Credentials,
}

impl PublicRoute {
    /// A route to every method under `resource` that needs a token.
    pub const fn token(resource: &'static str) -> PublicRoute {
        PublicRoute {
            name: resource,
            resource,
            mount: Mount::Api,
            methods: &[],
            exact: false,
            access: Access::Token,
        }
    }

    /// A route to every method under `resource` open to anyone but checking credentials.
    pub const fn credentials(resource: &'static str) -> PublicRoute {
        PublicRoute {
            access: Access::Credentials,
            ..PublicRoute::token(resource)
        }
    }

    /// The route to a consuming role's dead letters (`/api/v1/deadletters/<role>`, served by
    /// the runtime for every role; see [`crate::deadletters`]): `name` is
    /// `<role>-deadletters` and `resource` `deadletters/<role>`.
    pub const fn dead_letters(name: &'static str, resource: &'static str) -> PublicRoute {
        PublicRoute {
            name,
            ..PublicRoute::token(resource)
        }
    }

    /// A route to every method under `resource` open to anyone.
    pub const fn anyone(resource: &'static str) -> PublicRoute {
        PublicRoute {
            access: Access::Anyone,
            ..PublicRoute::token(resource)
        }
    }
}

impl ServiceSpec {
    /// Whether the role keeps nothing: no tables of its own, no topics published or
    /// consumed. Its store then holds only the outbox and inbox (`bazaar_messaging`), always empty, so each
    /// instance may have a store of its own (the web role).
    pub fn keeps_nothing(&self) -> bool {
        self.migrations.is_empty() && self.publishes.is_empty() && self.consumes.is_empty()
    }

    /// Whether this service declared that it consumes `topic`.
    pub fn consumes(&self, topic: &str) -> bool {
        self.consumes.contains(&topic)
    }
}
