//! File sources: a `[[federation]]` entry of Parquet, CSV or JSON files becomes one table,
//! DataFusion's own listing table, which prunes Parquet row groups and pushes projections and
//! filters down by itself. Files that cannot be read at startup become a table whose every scan
//! says why.
//!
//! This module only registers tables; it must not read the files itself, and it must not fail
//! the aggregator's startup: a missing path is a warning and an explaining table.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};
use runnel_config::FileFormat;

/// Registers a listing table over files; when that fails, a table that says why at every scan.
pub(super) async fn register_files(
    ctx: &SessionContext,
    name: &str,
    format: FileFormat,
    path: &Path,
    file_extension: &str,
    has_header: bool,
) {
    // DataFusion reads a path ending in '/' as a directory (every file below it), else as one file.
    let mut location = path.display().to_string();
    if path.is_dir() && !location.ends_with('/') {
        location.push('/');
    }
    let registered = if !path.exists() {
        Err(format!("{} does not exist", path.display()))
    } else {
        let registered = match format {
            FileFormat::Parquet => {
                let options = ParquetReadOptions::new().file_extension(file_extension);
                ctx.register_parquet(name, &location, options).await
            }
            FileFormat::Csv => {
                let options = CsvReadOptions::new()
                    .has_header(has_header)
                    .file_extension(file_extension)
                    .file_compression_type(compression_of(file_extension));
                ctx.register_csv(name, &location, options).await
            }
            FileFormat::Json => {
                let options = JsonReadOptions::default()
                    .file_extension(file_extension)
                    .file_compression_type(compression_of(file_extension));
                ctx.register_json(name, &location, options).await
            }
        };
        registered.map_err(|error| error.strip_backtrace())
    };
    match registered {
        Ok(()) => tracing::info!(
            federation = name,
            kind = format.as_str(),
            path = %path.display(),
            "federated files registered"
        ),
        Err(error) => {
            tracing::warn!(
                federation = name,
                kind = format.as_str(),
                path = %path.display(),
                %error,
                "federated files cannot be read; the table fails its queries until a restart"
            );
            let unavailable = UnavailableTable {
                message: format!(
                    "federation entry `{name}` ({} files at {}) could not be read when the \
                     aggregator started: {error}; fix it and restart the aggregator",
                    format.as_str(),
                    path.display()
                ),
            };
            if let Err(error) = ctx.register_table(name, Arc::new(unavailable)) {
                tracing::warn!(federation = name, error = %error.strip_backtrace(), "table not registered");
            }
        }
    }
}

/// CSV and JSON files are decompressed by the extension they are selected by: `.csv.gz`.
fn compression_of(file_extension: &str) -> FileCompressionType {
    let lower = file_extension.to_ascii_lowercase();
    if lower.ends_with(".gz") {
        FileCompressionType::GZIP
    } else if lower.ends_with(".bz2") {
        FileCompressionType::BZIP2
    } else if lower.ends_with(".xz") {
        FileCompressionType::XZ
    } else if lower.ends_with(".zst") {
        FileCompressionType::ZSTD
    } else {
        FileCompressionType::UNCOMPRESSED
    }
}

/// A file source that could not be read at startup: no columns, and every scan fails saying why.
#[derive(Debug)]
struct UnavailableTable {
    message: String,
}

#[async_trait]
impl TableProvider for UnavailableTable {
    fn schema(&self) -> SchemaRef {
        Arc::new(Schema::empty())
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::Plan(self.message.clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use datafusion::arrow::array::RecordBatch;
    use runnel_config::{FederationConfig, FederationSource};

    use super::super::register;
    use super::*;

    #[tokio::test]
    async fn file_sources_register_and_missing_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let regions = dir.path().join("regions");
        std::fs::create_dir_all(&regions).unwrap();
        std::fs::write(regions.join("a.csv"), "user_id,region\nu1,north\n").unwrap();
        std::fs::write(regions.join("b.csv"), "user_id,region\nu2,south\n").unwrap();
        std::fs::write(regions.join("c.txt"), "not,this\n").unwrap();
        let ctx = SessionContext::new();
        let entry = |name: &str, path: PathBuf| FederationConfig {
            name: name.into(),
            source: FederationSource::Files {
                format: FileFormat::Csv,
                path,
                file_extension: ".csv".into(),
                has_header: true,
            },
        };
        let entries = [
            entry("regions", regions),
            entry("gone", dir.path().join("missing")),
        ];
        register(&ctx, &entries, Duration::from_secs(30)).await;
        let batches = ctx
            .sql("SELECT user_id, region FROM regions ORDER BY user_id")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(text.contains("| u1      | north  |"), "{text}");
        assert!(text.contains("| u2      | south  |"), "{text}");
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        let error = match ctx.sql("SELECT * FROM gone").await {
            Ok(frame) => frame.collect().await.unwrap_err(),
            Err(error) => error,
        };
        let message = error.strip_backtrace();
        assert!(message.contains("federation entry `gone`"), "{message}");
        assert!(message.contains("does not exist"), "{message}");
    }
}
