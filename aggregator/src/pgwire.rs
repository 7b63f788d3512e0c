//! The PostgreSQL wire protocol: psql, Grafana's PostgreSQL data source, JDBC and psycopg query
//! the same DataFusion context as the HTTP API.
//!
//! datafusion-postgres (on pgwire) does the protocol work: simple and extended queries, parameter
//! types, result encoding, `SET`/`SHOW`, transactions, cursors, and a `pg_catalog` schema that
//! answers the catalog queries clients send (set up in the shared context by
//! [`crate::query::prepare_context`]). This module adds what makes it Runnel's:
//! - read-only: every statement other than a query, `EXPLAIN`, `SHOW`, `SET` (but not of the
//!   shared `datafusion.*` settings), a transaction or cursor command is refused before planning,
//!   in both protocols ([`ReadOnlyHook`], on [`crate::readonly`]);
//! - the `[query]` limits: results stream under a deadline of `query.timeout_ms` from the
//!   statement's start and fail past `query.max_result_rows` rows ([`Limited`]);
//! - authentication: SCRAM-SHA-256 against `[[query.users]]` ([`crate::auth::ScramUsers`]) when
//!   there are users, none otherwise (then the listener is on loopback, which config enforces).
//!
//! Architecture invariant: nothing sent over this protocol can change stored data or the
//! context's catalog; [`ReadOnlyHook`] is the first hook for every statement.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, QueryHook};
use futures::{Sink, StreamExt};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::ScramAuth;
use pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, StartupHandler};
use pgwire::api::portal::Portal;
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{QueryResponse, Response};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use runnel_config::QueryConfig;
use tokio::sync::watch;

use crate::auth::{SCRAM_ITERATIONS, ScramUsers};

/// Serves the PostgreSQL protocol on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: SessionContext,
    config: QueryConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let handlers = Arc::new(Handlers::new(ctx, &config));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                let handlers = Arc::clone(&handlers);
                tokio::spawn(async move {
                    if let Err(error) = pgwire::tokio::process_socket(socket, None, handlers).await
                    {
                        tracing::debug!(%peer, %error, "PostgreSQL connection ended with an error");
                    }
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "PostgreSQL listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct Handlers {
    service: Arc<Limited>,
    /// Salted passwords by user name; empty: no authentication.
    users: Arc<ScramUsers>,
}

impl Handlers {
    fn new(ctx: SessionContext, config: &QueryConfig) -> Handlers {
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(ReadOnlyHook),
            Arc::new(CursorStatementHook),
            Arc::new(SetShowHook),
            Arc::new(TransactionStatementHook),
        ];
        Handlers {
            service: Arc::new(Limited {
                inner: Arc::new(DfSessionService::new_with_hooks(Arc::new(ctx), hooks)),
                timeout: Duration::from_millis(config.timeout_ms),
                max_rows: config.max_result_rows,
            }),
            users: Arc::new(ScramUsers::new(&config.users)),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.service)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.service)
    }

    // Called once per connection: SASL keeps per-connection state.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(if self.users.is_empty() {
            Startup::Trust(Trust)
        } else {
            let mut scram = ScramAuth::new(Arc::clone(&self.users) as Arc<dyn AuthSource>);
            scram.set_iterations(SCRAM_ITERATIONS);
            Startup::Scram(Box::new(
                SASLAuthStartupHandler::new(Arc::new(parameters())).with_scram(scram),
            ))
        })
    }
}

fn parameters() -> DefaultServerParameterProvider {
    let mut parameters = DefaultServerParameterProvider::default();
    parameters.server_version = format!("16.0 (Runnel {})", env!("CARGO_PKG_VERSION"));
    parameters
}

/// How a connection logs in: nobody configured (loopback only), or SCRAM-SHA-256.
enum Startup {
    Trust(Trust),
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
}

struct Trust;

impl NoopStartupHandler for Trust {}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Trust(trust) => trust.on_startup(client, message).await,
            Startup::Scram(scram) => scram.on_startup(client, message).await,
        }
    }
}

/// Refuses every statement that could write or change the catalog, before it is planned, with
/// [`crate::readonly::check`] (the check every door runs).
struct ReadOnlyHook;

/// `Err` with SQLSTATE 25006 (read_only_sql_transaction) when `statement` may not run.
fn refuse_writes(statement: &Statement) -> Option<PgWireError> {
    let refusal = crate::readonly::check(statement, crate::readonly::Door::Session).err()?;
    Some(PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_owned(),
        "25006".to_owned(),
        refusal.to_string(),
    ))))
}

#[async_trait]
impl QueryHook for ReadOnlyHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refuse_writes(statement).map(Err)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        refuse_writes(statement).map(Err)
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refuse_writes(statement).map(Err)
    }
}

/// datafusion-postgres' service under `[query]`'s time and row limits.
struct Limited {
    inner: Arc<DfSessionService>,
    timeout: Duration,
    max_rows: usize,
}

impl Limited {
    fn timeout_error(&self) -> PgWireError {
        PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".to_owned(),
            // query_canceled
            "57014".to_owned(),
            format!(
                "query exceeded the time limit of {} ms (query.timeout_ms)",
                self.timeout.as_millis()
            ),
        )))
    }

    /// The response with its rows cut off at the deadline or past the row limit, as errors.
    fn limit(&self, response: Response, deadline: tokio::time::Instant) -> Response {
        let Response::Query(query) = response else {
            return response;
        };
        let QueryResponse {
            command_tag,
            row_schema,
            data_rows,
            ..
        } = query;
        let max_rows = self.max_rows;
        let timeout_error = self.timeout_error();
        let rows = futures::stream::unfold(
            (data_rows, 0usize, Some(timeout_error)),
            move |(mut rows, n, error)| async move {
                let error = error?;
                match tokio::time::timeout_at(deadline, rows.next()).await {
                    Err(_) => Some((Err(error), (rows, n, None))),
                    Ok(None) => None,
                    Ok(Some(Err(row_error))) => Some((Err(row_error), (rows, n, None))),
                    Ok(Some(Ok(_))) if n == max_rows => {
                        let too_many = PgWireError::UserError(Box::new(ErrorInfo::new(
                            "ERROR".to_owned(),
                            // program_limit_exceeded
                            "54000".to_owned(),
                            format!(
                                "the result has more than {max_rows} rows \
                                 (query.max_result_rows); add a LIMIT or aggregate"
                            ),
                        )));
                        Some((Err(too_many), (rows, n, None)))
                    }
                    Ok(Some(Ok(row))) => Some((Ok(row), (rows, n + 1, Some(error)))),
                }
            },
        );
        let mut limited = QueryResponse::new(row_schema, rows);
        limited.set_command_tag(&command_tag);
        Response::Query(limited)
    }
}

#[async_trait]
impl SimpleQueryHandler for Limited {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let _timer = crate::metrics::QueryTimer::new("pgwire");
        let deadline = tokio::time::Instant::now() + self.timeout;
        let responses = tokio::time::timeout_at(
            deadline,
            SimpleQueryHandler::do_query(&*self.inner, client, query),
        )
        .await
        .map_err(|_| self.timeout_error())??;
        Ok(responses
            .into_iter()
            .map(|response| self.limit(response, deadline))
            .collect())
    }
}

#[async_trait]
impl ExtendedQueryHandler for Limited {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = <DfSessionService as ExtendedQueryHandler>::QueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.inner.query_parser()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let _timer = crate::metrics::QueryTimer::new("pgwire");
        let deadline = tokio::time::Instant::now() + self.timeout;
        let response = tokio::time::timeout_at(
            deadline,
            ExtendedQueryHandler::do_query(&*self.inner, client, portal, max_rows),
        )
        .await
        .map_err(|_| self.timeout_error())??;
        Ok(self.limit(response, deadline))
    }
}
