//! The role table: every role's name, port and kind, and for a service its [`ServiceSpec`]
//! (tables, topics, public routes), its settings and its adapter. `up`, `serve`, `audit`,
//! the gateway's default config, the bench and the tests all iterate [`ROLES`]; the README's
//! "Adding a role" says what else a new row needs.

use bazaar_kit::service::ServiceSpec;

use crate::{
    adapters::{self, RunService, RunSimulator},
    settings::{
        GatewaySettings, InventorySettings, NotificationsSettings, OrdersSettings, PaymentsSettings, UsersSettings,
        WebSettings,
    },
};

/// One deployable part of the system: a row of [`ROLES`].
#[derive(Debug)]
pub struct RoleSpec {
    /// Its name on the command line and in logs, pid files and `BAZAAR_<ROLE>_…` variables.
    pub name: &'static str,
    /// One line for `bazaar serve --help`.
    pub about: &'static str,
    /// Adds its own settings to a command (`serve` refuses another role's from the command
    /// line).
    pub flags: fn(clap::Command) -> clap::Command,
    /// Its port's offset from the base port (docs/architecture.md, "Roles").
    pub port_offset: u16,
    /// What it is.
    pub kind: RoleKind,
}

/// The kinds of role.
#[derive(Debug)]
pub enum RoleKind {
    /// The gateway: routes clients to every service's public routes; health on its admin port.
    Gateway,
    /// A service of the shop, started by `up`.
    Service {
        /// Its name, tables, topics and routes.
        spec: &'static ServiceSpec,
        /// Runs it until shutdown.
        run: RunService,
    },
    /// A stand-in for an outside system, for local runs and fault drills; `up` leaves it out.
    Simulator {
        /// Serves it on the address until shutdown (over the mesh when the settings give it
        /// a certificate).
        run: RunSimulator,
    },
}

/// A role, as the command line names it.
pub type Role = &'static RoleSpec;

/// Every role: services first (the order `up` starts them), then the gateway, then tools.
pub static ROLES: [RoleSpec; 8] = [
    RoleSpec {
        name: "users",
        about: "Users and tokens.",
        flags: <UsersSettings as clap::Args>::augment_args,
        port_offset: 21,
        kind: RoleKind::Service {
            spec: &bazaar_users::SERVICE,
            run: adapters::users,
        },
    },
    RoleSpec {
        name: "inventory",
        about: "Products and stock.",
        flags: <InventorySettings as clap::Args>::augment_args,
        port_offset: 22,
        kind: RoleKind::Service {
            spec: &bazaar_inventory::SERVICE,
            run: adapters::inventory,
        },
    },
    RoleSpec {
        name: "orders",
        about: "Orders and the order saga.",
        flags: <OrdersSettings as clap::Args>::augment_args,
        port_offset: 23,
        kind: RoleKind::Service {
            spec: &bazaar_orders::SERVICE,
            run: adapters::orders,
        },
    },
    RoleSpec {
        name: "payments",
        about: "Wallets, ledger and payments.",
        flags: <PaymentsSettings as clap::Args>::augment_args,
        port_offset: 24,
        kind: RoleKind::Service {
            spec: &bazaar_payments::SERVICE,
            run: adapters::payments,
        },
    },
    RoleSpec {
        name: "notifications",
        about: "Email and texts to customers.",
        flags: <NotificationsSettings as clap::Args>::augment_args,
        port_offset: 25,
        kind: RoleKind::Service {
            spec: &bazaar_notifications::SERVICE,
            run: adapters::notifications,
        },
    },
    RoleSpec {
        name: "web",
        about: "The storefront in the browser, at the gateway's root.",
        flags: <WebSettings as clap::Args>::augment_args,
        port_offset: 27,
        kind: RoleKind::Service {
            spec: &bazaar_web::SERVICE,
            run: adapters::web,
        },
    },
    RoleSpec {
        name: "gateway",
        about: "The API gateway (Kong-compatible config).",
        flags: <GatewaySettings as clap::Args>::augment_args,
        port_offset: 0,
        kind: RoleKind::Gateway,
    },
    RoleSpec {
        name: PAYMENT_SIM,
        about: "A Stripe-like payment provider for local runs and drills (base port + 26); \
                point payments at it with BAZAAR_PAYMENT_PROVIDER_URL.",
        flags: std::convert::identity,
        port_offset: 26,
        kind: RoleKind::Simulator {
            run: adapters::payment_sim,
        },
    },
];

/// The gateway's admin listener (health, metrics, config) is at the base port plus this.
pub const GATEWAY_ADMIN_OFFSET: u16 = 20;

/// A service's plain health-and-metrics listener sits this far above its API port (orders:
/// 8103 and 8203), for probes and scrapers that hold no mesh certificate.
pub const ADMIN_PORT_OFFSET: u16 = 100;

/// The trust domain of the identities `bazaar up` issues; the gateway reaches each service
/// as the upstream `<service>.<trust domain>`, the name its certificate carries.
pub const TRUST_DOMAIN: &str = "bazaar";

/// Instance `k` of a service listens `k * REPLICA_STRIDE` above instance 0 (orders: 8103,
/// 8113, 8123, ...), so every instance of every role has a port of its own.
pub const REPLICA_STRIDE: u16 = 10;

/// Most instances of one service `up` runs (their ports stay below base + 100).
pub const MAX_INSTANCES: u16 = 8;

/// Client ports of the three JetStream nodes `up --cluster` runs, from the base port (in the
/// gaps between service instances' ports).
pub const NATS_CLIENT_OFFSETS: [u16; 3] = [10, 11, 12];
/// Their cluster route ports.
pub const NATS_ROUTE_OFFSETS: [u16; 3] = [13, 14, 15];

/// How many instances of each service run; one unless said otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replicas(std::collections::BTreeMap<&'static str, u16>);

impl Replicas {
    /// Instances of `role`.
    pub fn of(&self, role: Role) -> u16 {
        self.0.get(role.name).copied().unwrap_or(1)
    }

    /// Parses `N` (every service), `ROLE=N,ROLE=N`, or both (`2,orders=3`).
    pub fn parse(text: &str) -> Result<Replicas, String> {
        let mut replicas = Replicas::default();
        let count = |n: &str| -> Result<u16, String> {
            match n.trim().parse::<u16>() {
                Ok(n) if (1..=MAX_INSTANCES).contains(&n) => Ok(n),
                _ => Err(format!(
                    "a replica count must be 1 to {MAX_INSTANCES}, not `{}`",
                    n.trim()
                )),
            }
        };
        let mut every = None;
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                None => every = Some(count(item)?),
                Some((name, n)) => {
                    let role = RoleSpec::named(name.trim()).ok_or_else(|| {
                        let names: Vec<&str> = services().map(|(r, _)| r.name).collect();
                        format!("no role `{}`; services are {}", name.trim(), names.join(", "))
                    })?;
                    if !role.replicable() {
                        return Err(format!(
                            "{} runs once; only services and the gateway have replicas",
                            role.name
                        ));
                    }
                    replicas.0.insert(role.name, count(n)?);
                }
            }
        }
        if let Some(n) = every {
            for (role, _) in services() {
                replicas.0.entry(role.name).or_insert(n);
            }
        }
        Ok(replicas)
    }
}

/// `ROLE=N,ROLE=N`, as [`Replicas::parse`] reads it.
impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> = self.0.iter().map(|(role, n)| format!("{role}={n}")).collect();
        f.write_str(&items.join(","))
    }
}

/// The name of instance `k` of `role` in logs and pid files: `orders`, `orders-1`, ...
pub fn instance_name(role: Role, k: u16) -> String {
    if k == 0 {
        role.name.to_string()
    } else {
        format!("{}-{k}", role.name)
    }
}

impl RoleSpec {
    /// The role called `name`.
    pub fn named(name: &str) -> Option<Role> {
        ROLES.iter().find(|r| r.name == name)
    }

    /// The service spec, when the role is a service.
    pub fn service(&self) -> Option<&'static ServiceSpec> {
        match self.kind {
            RoleKind::Service { spec, .. } => Some(spec),
            _ => None,
        }
    }

    /// Whether `up` can run several instances of it.
    pub fn replicable(&self) -> bool {
        !matches!(self.kind, RoleKind::Simulator { .. })
    }

    /// Whether its instances share one port (the gateway's public and admin sockets, which
    /// `up` holds and hands to each) rather than each having its own.
    pub fn shares_port(&self) -> bool {
        matches!(self.kind, RoleKind::Gateway)
    }

    /// How far instance `k`'s ports sit above instance 0's: `k * REPLICA_STRIDE`, or nothing
    /// when the instances share one port.
    pub fn instance_stride(&self, k: u16) -> u16 {
        if self.shares_port() {
            0
        } else {
            k.saturating_mul(REPLICA_STRIDE)
        }
    }

    /// Whether `bazaar up` starts it.
    pub fn started_by_up(&self) -> bool {
        !matches!(self.kind, RoleKind::Simulator { .. })
    }

    /// Offset of the port its `/health` answers on.
    pub fn health_offset(&self) -> u16 {
        match self.kind {
            RoleKind::Gateway => GATEWAY_ADMIN_OFFSET,
            RoleKind::Service { .. } => self.port_offset + ADMIN_PORT_OFFSET,
            RoleKind::Simulator { .. } => self.port_offset,
        }
    }
}

/// The roles `bazaar up` starts.
pub fn up_roles() -> impl Iterator<Item = Role> {
    ROLES.iter().filter(|r| r.started_by_up())
}

/// Every service and its spec.
pub fn services() -> impl Iterator<Item = (Role, &'static ServiceSpec)> {
    ROLES.iter().filter_map(|r| Some((r, r.service()?)))
}

/// Every port offset a system may take (every role, every possible replica of a service, the
/// gateway admin): what a test or bench that runs the system beside others needs free.
pub fn port_offsets() -> Vec<u16> {
    let mut offsets: Vec<u16> = ROLES.iter().map(|r| r.port_offset).collect();
    for (role, _) in services() {
        offsets.extend((1..MAX_INSTANCES).map(|k| role.port_offset + k * REPLICA_STRIDE));
        offsets.extend((0..MAX_INSTANCES).map(|k| role.port_offset + k * REPLICA_STRIDE + ADMIN_PORT_OFFSET));
    }
    offsets.extend(NATS_CLIENT_OFFSETS.iter().chain(&NATS_ROUTE_OFFSETS));
    offsets.push(GATEWAY_ADMIN_OFFSET);
    offsets
}

/// Parses a role name on the command line, listing the table's roles in `--help`.
#[derive(Debug, Clone, Copy)]
pub struct RoleParser;

impl clap::builder::TypedValueParser for RoleParser {
    type Value = Role;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Role, clap::Error> {
        let name = value.to_string_lossy();
        RoleSpec::named(&name).ok_or_else(|| {
            let mut err = clap::Error::new(clap::error::ErrorKind::InvalidValue).with_cmd(cmd);
            use clap::error::{ContextKind, ContextValue};
            if let Some(arg) = arg {
                err.insert(ContextKind::InvalidArg, ContextValue::String(arg.to_string()));
            }
            err.insert(ContextKind::InvalidValue, ContextValue::String(name.into_owned()));
            err.insert(
                ContextKind::ValidValue,
                ContextValue::Strings(ROLES.iter().map(|r| r.name.to_string()).collect()),
            );
            err
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            ROLES
                .iter()
                .map(|r| clap::builder::PossibleValue::new(r.name).help(r.about)),
        ))
    }
}

/// The payment simulator's role name.
pub const PAYMENT_SIM: &str = bazaar_payments::simulator::ROLE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_has_its_own_name_and_port() {
        let mut names: Vec<&str> = ROLES.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ROLES.len(), "two roles share a name");
        let mut ports = port_offsets();
        ports.sort_unstable();
        ports.dedup();
        let replica_ports = services().count() * usize::from(MAX_INSTANCES - 1);
        let admin_ports = services().count() * usize::from(MAX_INSTANCES);
        assert_eq!(
            ports.len(),
            ROLES.len() + replica_ports + admin_ports + 6 + 1,
            "two instances share a port"
        );
        for (role, spec) in services() {
            assert_eq!(role.name, spec.name, "a service row is named as its spec");
        }
    }

    #[test]
    fn consumed_topics_are_listed_once_per_service() {
        for (_, spec) in services() {
            let mut topics = spec.consumes.to_vec();
            topics.sort_unstable();
            topics.dedup();
            assert_eq!(topics.len(), spec.consumes.len(), "{} lists a topic twice", spec.name);
        }
    }

    #[test]
    fn replicas_parse_per_role_or_for_every_service_and_refuse_the_rest() {
        let orders = RoleSpec::named("orders").unwrap();
        let users = RoleSpec::named("users").unwrap();
        let r = Replicas::parse("2,orders=3").unwrap();
        assert_eq!((r.of(orders), r.of(users)), (3, 2));
        let r = Replicas::parse("orders=3").unwrap();
        assert_eq!((r.of(orders), r.of(users)), (3, 1));
        // `up` hands its layout to every role in this form.
        assert_eq!(Replicas::parse(&r.to_string()), Ok(r));
        for (bad, says) in [
            ("orders=0", "1 to 8"),
            ("9", "1 to 8"),
            ("orders=lots", "not `lots`"),
            ("shipping=2", "no role `shipping`"),
            ("payment-sim=2", "only services and the gateway have replicas"),
        ] {
            let err = Replicas::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn every_role_setting_belongs_to_one_role_and_up_and_serve_take_them_all() {
        let ids = |cmd: clap::Command| -> Vec<String> { cmd.get_arguments().map(|a| a.get_id().to_string()).collect() };
        let mut of_rows: Vec<String> = ROLES
            .iter()
            .flat_map(|r| ids((r.flags)(clap::Command::new(r.name))))
            .collect();
        of_rows.sort();
        let before = of_rows.len();
        of_rows.dedup();
        assert_eq!(of_rows.len(), before, "two roles claim one setting");
        let mut all = ids(<crate::settings::RoleSettings as clap::Args>::augment_args(
            clap::Command::new("up"),
        ));
        all.sort();
        assert_eq!(of_rows, all, "the rows' settings are the ones up and serve take");
    }
}
