//! The finishing touches of the OpenAPI document the routes describe: what every operation
//! of a kind can answer (a body can be unparseable, too large or too slow; any request can
//! carry too many headers; a new order can be shed), a description for every response, the
//! admin token as a security scheme, the username rule as a pattern, links from a new order
//! to where it can be followed, `/metrics` and the health endpoints. The routes describe what
//! is particular to them; this adds what is common, so no route can forget it.

use serde_json::{Value, json};
use utoipa::openapi::OpenApi;

/// The document's description: true of both the embedded mode and the servers.
const DESCRIPTION: &str = "Late-Day Tokens Marketplace. An order runs as a saga — payment → \
inventory → delivery — across services that each own a database and talk over a message bus \
(RabbitMQ, or in the embedded mode an in-process bus journaled on disk); a step that fails or \
stalls past its deadline is undone, the steps before it in reverse order, and the order ends \
with one final status. Placing an order answers at once with the PENDING order; poll it, or \
follow `/api/v1/orders/events`.\n\nErrors are always JSON `{\"error\": kind, \"message\": text}`. \
Actions that change the marketplace's state outside an order (restock, replay, retry, cancel, \
fault flags) need `Authorization: Bearer <admin token>` when the marketplace has one.";

/// Operations that place an order, and so can be shed under overload.
const PLACING: [(&str, &str); 3] = [
    ("/api/v1/orders", "post"),
    ("/api/purchase", "post"),
    ("/api/purchase/", "post"),
];

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// The document with what every operation shares added.
pub fn finish(doc: OpenApi, username_pattern: &str) -> OpenApi {
    let Ok(mut v) = serde_json::to_value(&doc) else {
        return doc;
    };
    v["info"]["title"] = json!("Late-Day Tokens Marketplace");
    v["info"]["description"] = json!(DESCRIPTION);
    v["components"]["securitySchemes"]["admin_token"] = json!({
        "type": "http",
        "scheme": "bearer",
        "description": "The marketplace's admin token (`--admin-token`, `LDT_ADMIN_TOKEN`); \
                        without one configured, admin actions need none."
    });
    for schema in ["CreateOrder", "LegacyPurchase"] {
        if let Some(username) = v["components"]["schemas"][schema]["properties"].get_mut("username")
        {
            username["pattern"] = json!(username_pattern);
        }
    }
    if let Some(paths) = v["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(ops) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in ops.iter_mut() {
                finish_operation(path, method, op);
                // A username in a path or query string follows the same rule as in a body.
                if let Some(params) = op["parameters"].as_array_mut() {
                    for param in params.iter_mut().filter(|p| p["name"] == "username") {
                        param["schema"]["pattern"] = json!(username_pattern);
                    }
                }
            }
        }
        paths.insert(
            "/metrics".into(),
            json!({"get": {
                "tags": ["health"],
                "operationId": "metrics",
                "summary": "This process's metrics, in the Prometheus text format.",
                "responses": {"200": {
                    "description": "Counters, gauges and histograms (`ldt_orders_total`, \
                                    `ldt_saga_duration_ms`, `ldt_sagas_stuck`, …)",
                    "content": {"text/plain": {"schema": {"type": "string"}}}
                }}
            }}),
        );
    }
    health(&mut v);
    links(&mut v);
    serde_json::from_value(v).unwrap_or(doc)
}

fn finish_operation(path: &str, method: &str, op: &mut Value) {
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    let has = |place: &str| params.iter().any(|p| p["in"] == place);
    let has_body = op.get("requestBody").is_some();
    let Some(responses) = op["responses"].as_object_mut() else {
        return;
    };
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| error(description));
    };
    add(
        "431",
        "Too many headers, or too large a head: at most 100 headers of 64 KiB in all",
    );
    if path.starts_with("/api/") {
        add(
            "500",
            "Something failed on the marketplace's side; nothing was changed",
        );
    }
    if has_body {
        add("400", "The body is not JSON");
        add("408", "The body did not arrive in time");
        add("413", "The body is too large");
        add(
            "422",
            "The body is JSON of the wrong shape or with an invalid value",
        );
    }
    if has("query") {
        add("422", "An invalid query parameter");
    }
    if has("path") {
        add(
            "400",
            "A path parameter that is not valid UTF-8 once decoded",
        );
    }
    if has("header") {
        add("422", "An invalid header");
    }
    if PLACING.contains(&(path, method)) {
        responses.entry("503".to_owned()).or_insert_with(|| {
            let mut shed =
                error("Too many orders in flight, and no place came up while the order waited at the door (`--admission-wait-ms`): nothing was stored; try again after `Retry-After`");
            shed["headers"] = json!({"Retry-After": {
                "description": "Seconds to wait before trying again",
                "schema": {"type": "integer", "minimum": 1}
            }});
            shed
        });
    }
    if path.starts_with("/api/") {
        responses.entry("503".to_owned()).or_insert_with(|| {
            let mut down = error(
                "The service's database is out of reach for now (a restart, a failover): \
                 nothing was done; try again after `Retry-After`",
            );
            down["headers"] = json!({"Retry-After": {
                "description": "Seconds to wait before trying again",
                "schema": {"type": "integer", "minimum": 1}
            }});
            down
        });
    }
    for (status, response) in responses.iter_mut() {
        let missing = response
            .get("description")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        if missing {
            let reason = status
                .parse::<u16>()
                .ok()
                .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Response");
            response["description"] = json!(reason);
        }
    }
}

fn health(v: &mut Value) {
    let status = |value: &str| {
        json!({"type": "object", "required": ["status"],
               "properties": {"status": {"type": "string", "enum": [value]}}})
    };
    if let Some(ok) = v["paths"]["/healthz"]["get"]["responses"].get_mut("200") {
        ok["description"] = json!("The process is up");
        ok["content"] = json!({"application/json": {"schema": status("ok")}});
    }
    if let Some(responses) = v["paths"]["/readyz"]["get"]["responses"].as_object_mut() {
        responses.insert(
            "200".into(),
            json!({"description": "The broker and every database of this process answer",
                   "content": {"application/json": {"schema": status("ready")}}}),
        );
        responses.insert(
            "503".into(),
            json!({"description": "Not ready, and why (the broker unreachable or blocking publishes, a database unreachable)",
                   "content": {"application/json": {"schema": {
                       "type": "object",
                       "required": ["error", "message", "status", "problems"],
                       "properties": {
                           "error": {"type": "string", "enum": ["not_ready"]},
                           "message": {"type": "string"},
                           "status": {"type": "string", "enum": ["not ready"]},
                           "problems": {"type": "array", "items": {"type": "string"}}
                       }}}}}),
        );
    }
}

/// Where a new order can be followed: for schemathesis's stateful runs, and for readers.
fn links(v: &mut Value) {
    let follow = json!({
        "GetOrder": {"operationId": "get_order", "parameters": {"id": "$response.body#/id"},
                     "description": "The order, as its saga moves it"},
        "GetSaga": {"operationId": "get_saga", "parameters": {"order_id": "$response.body#/id"},
                    "description": "Its saga: every command, answer and compensation"},
        "CancelOrder": {"operationId": "cancel_order", "parameters": {"id": "$response.body#/id"},
                        "description": "Cancel it while it is PENDING"}
    });
    for (path, status) in [
        ("/api/v1/orders", "202"),
        ("/api/v1/orders", "200"),
        ("/api/purchase", "200"),
        ("/api/purchase/", "200"),
    ] {
        if let Some(response) = v["paths"][path]["post"]["responses"].get_mut(status) {
            response["links"] = follow.clone();
        }
    }
}
