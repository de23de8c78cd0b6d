//! Where every role listens and how it is reached, from the settings and the role table:
//! ports from the base port, health URLs, the users service's keys, the gateway's routes and
//! its generated config, and a process's share of its store's connections.

use std::path::PathBuf;

use anyhow::Context;
use bazaar_kit::service::Access;

use crate::{
    roles::{services, Replicas, Role, RoleKind, RoleSpec, ADMIN_PORT_OFFSET, GATEWAY_ADMIN_OFFSET, ROLES},
    settings::{Process, Settings, SERVICE_CONNECTIONS},
};

impl Settings {
    /// The port of `role` (its first instance).
    pub fn port(&self, role: Role) -> u16 {
        self.instance_port(role, 0)
    }

    /// The port of instance `k` of `role`.
    pub fn instance_port(&self, role: Role, k: u16) -> u16 {
        self.place
            .base_port
            .saturating_add(role.port_offset)
            .saturating_add(role.instance_stride(k))
    }

    /// The gateway's admin port.
    pub fn admin_port(&self) -> u16 {
        self.place.base_port.saturating_add(GATEWAY_ADMIN_OFFSET)
    }

    /// The URL of `role`'s `/health` (its first instance).
    pub fn health_url(&self, role: Role) -> String {
        self.instance_health_url(role, 0)
    }

    /// The URL of instance `k` of `role`'s `/health`.
    pub fn instance_health_url(&self, role: Role, k: u16) -> String {
        let port = match role.kind {
            RoleKind::Gateway => self.admin_port(),
            RoleKind::Service { .. } => self.instance_port(role, k).saturating_add(ADMIN_PORT_OFFSET),
            RoleKind::Simulator { .. } => self.instance_port(role, k),
        };
        format!("http://127.0.0.1:{port}/health")
    }

    /// The URL of the users service's JWKS: as set, else users on this machine, reached by
    /// name over the mesh (`https://users:PORT/…`) when the caller holds a mesh certificate.
    pub fn jwks_url(&self, over_mesh: bool) -> String {
        self.place.jwks_url.clone().unwrap_or_else(|| {
            let users = RoleSpec::named(bazaar_users::SERVICE.name).map_or(0, |r| self.port(r));
            let path = bazaar_kit::auth::JWKS_PATH;
            match over_mesh {
                true => format!("https://{}:{users}{path}", bazaar_users::SERVICE.name),
                false => format!("http://127.0.0.1:{users}{path}"),
            }
        })
    }

    /// Writes the default gateway config for these ports and `replicas` when the file is
    /// missing, or (`refresh`) when it is one bazaar generated and nobody claimed by
    /// deleting its first line; a file of the operator's own is left alone.
    pub fn ensure_gateway_config(
        &self,
        replicas: &Replicas,
        redis: Option<&str>,
        refresh: bool,
        mesh: Option<&bazaar_gateway::DefaultMesh<'_>>,
    ) -> anyhow::Result<PathBuf> {
        let path = self.gateway_config();
        let generated =
            || std::fs::read_to_string(&path).is_ok_and(|text| text.starts_with(bazaar_gateway::GENERATED_MARKER));
        if !path.exists() || (refresh && generated()) {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            // Over the mesh the gateway reaches users' keys as it reaches users.
            let jwks_uri = match mesh {
                Some(mesh) => format!(
                    "https://{}.{}{}",
                    bazaar_users::SERVICE.name,
                    mesh.trust_domain,
                    bazaar_kit::auth::JWKS_PATH
                ),
                None => self.jwks_url(false),
            };
            let text = bazaar_gateway::default_config(&self.public_routes(replicas), redis, &jwks_uri, mesh);
            bazaar_trust::files::write_private(&path, &text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(path)
    }

    /// Every service's public routes, at the ports of its instances: what the default
    /// gateway config serves.
    pub fn public_routes(&self, replicas: &Replicas) -> Vec<bazaar_gateway::DefaultRoute<'static>> {
        services()
            .flat_map(|(role, spec)| {
                let targets: Vec<u16> = (0..replicas.of(role)).map(|k| self.instance_port(role, k)).collect();
                spec.routes.iter().map(move |r| bazaar_gateway::DefaultRoute {
                    name: r.name,
                    resource: r.resource,
                    prefix: r.mount.prefix(),
                    service: role.name,
                    targets: targets.clone(),
                    methods: r.methods,
                    exact: r.exact,
                    jwt: r.access == Access::Token,
                    credentials: r.access == Access::Credentials,
                })
            })
            .collect()
    }
}

impl Process {
    /// Connections this instance of `role` opens to a PostgreSQL store: `--store-pool`, or
    /// its share of [`SERVICE_CONNECTIONS`] among the role's replicas.
    pub fn store_pool(&self, role: Role) -> anyhow::Result<u32> {
        if let Some(size) = self.store_pool {
            return Ok(size);
        }
        Ok((SERVICE_CONNECTIONS / u32::from(self.replicas()?.of(role).max(1))).max(2))
    }

    /// How many instances of each role run, as `bazaar up` told this process.
    pub fn replicas(&self) -> anyhow::Result<Replicas> {
        match &self.layout {
            Some(text) => Replicas::parse(text).map_err(|e| anyhow::anyhow!("BAZAAR_REPLICAS: {e}")),
            None => Ok(Replicas::default()),
        }
    }

    /// Role names and where they are reached, for mesh clients (none: DNS).
    pub fn peers(&self) -> Vec<(String, std::net::IpAddr)> {
        match self.peer_ip {
            Some(ip) => ROLES.iter().map(|r| (r.name.to_string(), ip)).collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::settings::parse_for_test;

    #[test]
    fn the_replicas_of_a_service_share_its_postgresql_connections() {
        let orders: Role = RoleSpec::named("orders").unwrap();
        let pool = |args: &[&str]| parse_for_test(Path::new("data"), args).1.store_pool(orders).unwrap();
        assert_eq!(pool(&[]), SERVICE_CONNECTIONS);
        assert_eq!(pool(&["--layout", "2"]), SERVICE_CONNECTIONS / 2);
        assert_eq!(pool(&["--layout", "orders=8"]), 2, "never fewer than two");
        assert_eq!(pool(&["--layout", "orders=8", "--store-pool", "5"]), 5, "the flag wins");
    }

    #[test]
    fn ports_follow_the_design_map_under_the_default_base() {
        let (s, _) = parse_for_test(Path::new("data"), &[]);
        let port = |name| s.port(RoleSpec::named(name).unwrap());
        assert_eq!(
            [
                port("gateway"),
                port("users"),
                port("inventory"),
                port("orders"),
                port("payments"),
                port("notifications")
            ],
            [8080, 8101, 8102, 8103, 8104, 8105]
        );
        assert_eq!(
            s.health_url(RoleSpec::named("gateway").unwrap()),
            "http://127.0.0.1:8100/health"
        );
        assert_eq!(
            s.health_url(RoleSpec::named("orders").unwrap()),
            "http://127.0.0.1:8203/health"
        );
    }

    #[test]
    fn each_resource_is_served_by_one_service_and_each_route_named_once() {
        let (s, _) = parse_for_test(Path::new("data"), &[]);
        let routes = s.public_routes(&Replicas::default());
        for r in &routes {
            assert_eq!(
                routes.iter().filter(|o| o.name == r.name).count(),
                1,
                "route {}",
                r.name
            );
            assert!(
                routes
                    .iter()
                    .all(|o| o.resource != r.resource || o.service == r.service),
                "/{} is served by two services",
                r.resource
            );
        }
    }

    #[test]
    fn the_default_gateway_config_is_valid_and_routes_every_service() {
        let dir = tempfile::tempdir().unwrap();
        let path = parse_for_test(dir.path(), &[])
            .0
            .ensure_gateway_config(&Replicas::default(), None, true, None)
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        bazaar_gateway::check_config_file(&path).unwrap_or_else(|p| panic!("{p:?}"));
        for (role, spec) in services() {
            for route in spec.routes {
                let url = format!("url: http://127.0.0.1:{}/{}", 8080 + role.port_offset, route.resource);
                assert!(text.contains(&url), "no upstream {url} for route {}", route.name);
            }
        }
    }

    #[test]
    fn every_replica_gets_a_port_of_its_own_and_the_gateway_balances_over_them() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = parse_for_test(dir.path(), &[]);
        let orders = RoleSpec::named("orders").unwrap();
        assert_eq!([0, 1, 2].map(|k| s.instance_port(orders, k)), [8103, 8113, 8123]);
        let replicas = Replicas::parse("orders=2").unwrap();
        let path = s
            .ensure_gateway_config(&replicas, Some("redis://127.0.0.1:6379"), true, None)
            .unwrap();
        bazaar_gateway::check_config_file(&path).unwrap_or_else(|p| panic!("{p:?}"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("target: 127.0.0.1:8103") && text.contains("target: 127.0.0.1:8113"),
            "{text}"
        );
        // A file the operator claimed (marker line deleted) is never rewritten.
        std::fs::write(&path, text.replacen(bazaar_gateway::GENERATED_MARKER, "# mine", 1)).unwrap();
        s.ensure_gateway_config(&Replicas::default(), None, true, None).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("# mine"));
    }
}
