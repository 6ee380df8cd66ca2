//! Request authentication. OAuth 2.0 client credentials (with its token cache) plugs in here.

use reqwest::RequestBuilder;
use secrecy::ExposeSecret;

use crate::config::AuthPlan;

/// Adds the connector's credentials to a request.
pub fn authorize(request: RequestBuilder, auth: &AuthPlan) -> RequestBuilder {
    match auth {
        AuthPlan::None => request,
        AuthPlan::Bearer(token) => request.bearer_auth(token.expose_secret()),
    }
}
