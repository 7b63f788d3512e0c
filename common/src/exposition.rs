//! The Prometheus text exposition format for series computed at scrape time (both binaries'
//! `/metrics` append these after what their `metrics` recorder renders).

use std::fmt::Write;

/// Appends `# HELP`, `# TYPE` and sample lines to a string.
pub struct Exposition<'a>(pub &'a mut String);

impl Exposition<'_> {
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, help, "gauge");
        let _ = writeln!(self.0, "{name} {value}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        let _ = writeln!(self.0, "{name} {value}");
    }

    /// A gauge with one sample per value of `label`.
    pub fn labelled_gauges<'v>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: impl Iterator<Item = (&'v str, f64)>,
    ) {
        self.header(name, help, "gauge");
        for (label_value, value) in values {
            let escaped = label_value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(self.0, "{name}{{{label}=\"{escaped}\"}} {value}");
        }
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_follow_the_text_format() {
        let mut text = String::new();
        let mut out = Exposition(&mut text);
        out.gauge("a_bytes", "Bytes.", 1.5);
        out.counter("b_total", "Things.", 7);
        out.labelled_gauges(
            "c",
            "Per agent.",
            "agent_id",
            [("edge \"1\"", 2.0)].into_iter(),
        );
        assert_eq!(
            text,
            "# HELP a_bytes Bytes.\n# TYPE a_bytes gauge\na_bytes 1.5\n\
             # HELP b_total Things.\n# TYPE b_total counter\nb_total 7\n\
             # HELP c Per agent.\n# TYPE c gauge\nc{agent_id=\"edge \\\"1\\\"\"} 2\n"
        );
    }
}
