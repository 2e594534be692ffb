//! Cost: each request's cost from its token usage and the pool's prices, what the same usage
//! would have cost in the premium pool (the savings of routing), and monthly budgets per
//! tenant and per pool (calendar months, UTC).
//!
//! With `--redis` the spending is shared by every replica ([`super::spend`]): each budgeted
//! request reads its tenant's (and step's pool's) total of the month, and each answer adds
//! its cost, before a whole answer is returned (a stream adds it when it ends). Requests in
//! flight at once on several replicas may each pass the check before the others' costs
//! land: a budget is overspent by at most the cost of the requests in flight when it runs
//! out. Without Redis each replica keeps its own figures in memory: N replicas may spend up
//! to N budgets, and a restart starts the month afresh.

use super::metrics::{BudgetLabels, CostLabels, TenantLabels, routing_metrics};
use super::plan::{Plan, Price};
use super::spend::{self, SharedSpend};
use crate::providers::types::Usage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// USD of `usage` at `price` (per million input and output tokens).
pub fn cost_of(price: Price, usage: &Usage) -> f64 {
    (f64::from(usage.prompt_tokens) * price.0 + f64::from(usage.completion_tokens) * price.1)
        / 1_000_000.0
}

/// A monthly budget is spent: the caller is refused with 429 until the month ends.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the monthly cost budget of {scope} {name:?} (USD {limit:.2}) is spent; it renews at the start of next month (UTC)"
)]
pub struct OverBudget {
    /// `tenant` or `pool`.
    pub scope: &'static str,
    /// Its name.
    pub name: String,
    /// The budget in USD.
    pub limit: f64,
    /// Until the month ends.
    pub retry_after: Duration,
}

/// Months since 1970-01 (UTC) at `unix` seconds, and the seconds left in that month.
pub fn month_at(unix: u64) -> (u32, u64) {
    let days = unix / 86_400;
    let (y, m) = civil(days as i64);
    let month = (y * 12 + i64::from(m) - 1 - 1970 * 12) as u32;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let next = days_from_civil(ny, nm) as u64 * 86_400;
    (month, next.saturating_sub(unix))
}

/// (year, month 1..=12) of a day count since 1970-01-01 (H. Hinnant's civil_from_days).
fn civil(z: i64) -> (i64, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// Days since 1970-01-01 of the first day of `m` in `y`.
fn days_from_civil(y: i64, m: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Spending by (scope, name): the month it is for and the USD spent in it.
type Spent = HashMap<(&'static str, String), (u32, f64)>;

/// Spending this month per tenant and per pool: this replica's figures, and with Redis the
/// totals every replica shares.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The best total known here: the last shared total read or written, plus what this
    /// replica spent since; all of it without Redis.
    spent: Mutex<Spent>,
    shared: Option<Arc<SharedSpend>>,
}

/// Costs still on their way to the shared totals: awaited before a whole answer is
/// returned, so that the next request, on any replica, sees them.
#[derive(Debug, Default)]
#[must_use = "await it, or drop it to let the write finish on its own"]
pub struct Writing(Option<tokio::task::JoinHandle<()>>);

impl Writing {
    /// Waits until the shared totals hold the costs (or the write failed).
    pub async fn done(self) {
        if let Some(task) = self.0 {
            let _ = task.await;
        }
    }
}

/// The Redis key of `name`'s spending (`scope` `tenant` or `pool`) in `month`.
fn key(scope: &str, name: &str, month: u32) -> String {
    floodgate_crds::redis_keys::cost_spend(scope, name, 1970 + month / 12, month % 12 + 1)
}

impl Ledger {
    /// A ledger whose totals are shared through `shared`.
    pub fn shared(shared: SharedSpend) -> Self {
        Self {
            spent: Mutex::default(),
            shared: Some(Arc::new(shared)),
        }
    }

    fn spent(&self, scope: &'static str, name: &str, month: u32) -> f64 {
        let spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        match spent.get(&(scope, name.to_owned())) {
            Some((m, usd)) if *m == month => *usd,
            _ => 0.0,
        }
    }

    /// Raises the figure of `name` in `month` to the shared `total` (totals only grow
    /// within a month; an answer that lands late does not lower it).
    fn saw(&self, scope: &'static str, name: &str, month: u32, total: f64) -> f64 {
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        let entry = spent
            .entry((scope, name.to_owned()))
            .or_insert((month, 0.0));
        if entry.0 != month {
            *entry = (month, 0.0);
        }
        entry.1 = entry.1.max(total);
        entry.1
    }

    /// Refuses when `name`'s budget in `budgets` is spent this month (at `unix` seconds), by
    /// this replica's figures; sets its gauges to them (in a new month, back to 0).
    pub fn check_at(
        &self,
        scope: &'static str,
        name: &str,
        budgets: &HashMap<String, f64>,
        alert_at: f64,
        unix: u64,
    ) -> Result<(), OverBudget> {
        let Some(&limit) = budgets.get(name) else {
            return Ok(());
        };
        let (month, left) = month_at(unix);
        let spent = self.spent(scope, name, month);
        gauges(scope, name, spent, limit, alert_at);
        verdict(scope, name, limit, spent, left)
    }

    /// Refuses when `name`'s budget in `budgets` is spent this month: with Redis by the
    /// total every replica spent (one read), else, or when Redis fails, by this replica's
    /// figures.
    pub async fn check(
        &self,
        scope: &'static str,
        name: &str,
        budgets: &HashMap<String, f64>,
        alert_at: f64,
    ) -> Result<(), OverBudget> {
        let Some(&limit) = budgets.get(name) else {
            return Ok(());
        };
        let (month, left) = month_at(unix_now());
        let mut spent = self.spent(scope, name, month);
        if let Some(shared) = &self.shared
            && let Ok(totals) = shared.totals(vec![key(scope, name, month)]).await
            && let Some(&total) = totals.first()
        {
            spent = self.saw(scope, name, month, total);
        }
        gauges(scope, name, spent, limit, alert_at);
        verdict(scope, name, limit, spent, left)
    }

    /// [`Ledger::add_at`] now, for each of `adds` (scope, name, its budgets) that has a
    /// budget, and with Redis the write of the cost to the shared totals, under way.
    pub fn add(
        self: &Arc<Self>,
        adds: &[(&'static str, &str, &HashMap<String, f64>)],
        usd: f64,
        alert_at: f64,
    ) -> Writing {
        let unix = unix_now();
        let budgeted: Vec<(&'static str, String, f64)> = adds
            .iter()
            .filter_map(|&(scope, name, budgets)| {
                let limit = *budgets.get(name)?;
                self.add_at(scope, name, usd, budgets, alert_at, unix);
                Some((scope, name.to_owned(), limit))
            })
            .collect();
        let Some(shared) = self.shared.clone().filter(|_| !budgeted.is_empty()) else {
            return Writing(None);
        };
        // Outside a runtime (a stream dropped at shutdown) the cost stays on this replica.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Writing(None);
        };
        let (month, left) = month_at(unix);
        let writes = budgeted
            .iter()
            .map(|(scope, name, _)| (key(scope, name, month), usd))
            .collect();
        let ledger = self.clone();
        Writing(Some(runtime.spawn(async move {
            let Ok(totals) = shared.add(writes, spend::keep_for(left)).await else {
                return;
            };
            for ((scope, name, limit), total) in budgeted.iter().zip(totals) {
                let total = ledger.saw(scope, name, month, total);
                gauges(scope, name, total, *limit, alert_at);
            }
        })))
    }

    /// Adds `usd` to `name`'s spending this month (at `unix`) on this replica, and sets its
    /// metrics when it has a budget.
    pub fn add_at(
        &self,
        scope: &'static str,
        name: &str,
        usd: f64,
        budgets: &HashMap<String, f64>,
        alert_at: f64,
        unix: u64,
    ) {
        let Some(&limit) = budgets.get(name) else {
            return;
        };
        let (month, _) = month_at(unix);
        let total = {
            let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
            let entry = spent
                .entry((scope, name.to_owned()))
                .or_insert((month, 0.0));
            if entry.0 != month {
                *entry = (month, 0.0);
            }
            entry.1 += usd;
            entry.1
        };
        gauges(scope, name, total, limit, alert_at);
    }
}

/// The spending and alert gauges of `name`'s budget at `total`.
fn gauges(scope: &'static str, name: &str, total: f64, limit: f64, alert_at: f64) {
    let labels = BudgetLabels {
        scope,
        name: name.to_owned(),
    };
    let m = routing_metrics();
    m.budget_spent.get_or_create(&labels).set(total);
    let alert = i64::from(total >= limit * alert_at);
    m.budget_alert.get_or_create(&labels).set(alert);
}

/// Refuses `name` when `spent` reached its `limit`, `left` seconds before the month ends.
fn verdict(
    scope: &'static str,
    name: &str,
    limit: f64,
    spent: f64,
    left: u64,
) -> Result<(), OverBudget> {
    if spent < limit {
        return Ok(());
    }
    routing_metrics()
        .budget_refusals
        .get_or_create(&BudgetLabels {
            scope,
            name: name.to_owned(),
        })
        .inc();
    Err(OverBudget {
        scope,
        name: name.to_owned(),
        limit,
        retry_after: Duration::from_secs(left.max(1)),
    })
}

/// The cost of one answered request, recorded on the metrics and budgets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costed {
    /// USD at the serving pool's prices.
    pub usd: f64,
    /// USD at the premium pool's prices, if one is named.
    pub premium_usd: Option<f64>,
}

/// Records `usage` of a request of `tenant` for `model`, served by `provider` of `pool`:
/// its cost, the premium equivalent, and the tenant's and pool's monthly spending (with the
/// write to Redis's shared totals under way, [`Writing`]). No cost when the model has no
/// price in the configuration.
#[expect(
    clippy::too_many_arguments,
    reason = "the labels of one request; called twice"
)]
pub fn record(
    plan: &Plan,
    ledger: &Arc<Ledger>,
    tenant: &str,
    pool: Option<&str>,
    provider: &str,
    model: &str,
    requested: &str,
    usage: &Usage,
) -> (Option<Costed>, Writing) {
    let Some(price) = plan.price(pool, provider, model) else {
        return (None, Writing::default());
    };
    let usd = cost_of(price, usage);
    let m = routing_metrics();
    m.cost
        .get_or_create(&CostLabels {
            tenant: tenant.to_owned(),
            provider: provider.to_owned(),
            model: requested.to_owned(),
        })
        .inc_by(usd);
    let premium_usd = plan.premium_price(requested).map(|p| cost_of(p, usage));
    if let Some(premium) = premium_usd {
        let t = TenantLabels {
            tenant: tenant.to_owned(),
        };
        m.premium_equivalent.get_or_create(&t).inc_by(premium);
        m.savings.get_or_create(&t).inc_by((premium - usd).max(0.0));
    }
    let mut adds = vec![("tenant", tenant, &plan.tenant_budgets)];
    if let Some(pool) = pool {
        adds.push(("pool", pool, &plan.pool_budgets));
    }
    let writing = ledger.add(&adds, usd, plan.alert_at);
    (Some(Costed { usd, premium_usd }), writing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_usage_times_price() {
        // claude-sonnet-4 at 3 / 15 USD per million: 1,000 in + 500 out = 0.003 + 0.0075.
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            total_tokens: 1500,
        };
        assert!((cost_of((3.0, 15.0), &usage) - 0.0105).abs() < 1e-12);
        assert_eq!(cost_of((0.0, 0.0), &usage), 0.0);
    }

    #[test]
    fn months_and_the_time_left_in_them() {
        // 2026-11-30T15:00:00Z: month 56*12+10, 9 h left.
        let t = 1_796_050_800;
        assert_eq!(month_at(t), (56 * 12 + 10, 9 * 3600));
        // The last second of November, then December.
        let dec = t + 9 * 3600;
        assert_eq!(month_at(dec - 1).0, 56 * 12 + 10);
        assert_eq!(month_at(dec - 1).1, 1);
        assert_eq!(month_at(dec), (56 * 12 + 11, 31 * 86_400));
        // A leap February.
        let feb_2028 = days_from_civil(2028, 2) as u64 * 86_400;
        assert_eq!(month_at(feb_2028).1, 29 * 86_400);
    }

    #[test]
    fn a_spent_budget_refuses_until_the_month_ends() {
        let ledger = Ledger::default();
        let budgets: HashMap<String, f64> = [("ledger-co".to_owned(), 1.0)].into();
        let t = 1_796_050_800;
        let check = |at| ledger.check_at("tenant", "ledger-co", &budgets, 0.5, at);
        assert!(check(t).is_ok());
        ledger.add_at("tenant", "ledger-co", 0.6, &budgets, 0.5, t);
        assert!(check(t).is_ok());
        ledger.add_at("tenant", "ledger-co", 0.4, &budgets, 0.5, t);
        let refused = check(t).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(9 * 3600));
        assert_eq!(refused.scope, "tenant");
        // A tenant without a budget is never refused.
        assert!(ledger.check_at("tenant", "other", &budgets, 0.5, t).is_ok());
        let labels = BudgetLabels {
            scope: "tenant",
            name: "ledger-co".into(),
        };
        let m = routing_metrics();
        assert_eq!(m.budget_alert.get_or_create(&labels).get(), 1);
        // The last second of the month: still spent. The next month starts afresh, and so
        // do the budget's gauges.
        let december = t + 9 * 3600;
        assert!(check(december - 1).is_err());
        assert_eq!(m.budget_alert.get_or_create(&labels).get(), 1);
        assert!(check(december).is_ok());
        assert_eq!(m.budget_alert.get_or_create(&labels).get(), 0);
        assert_eq!(m.budget_spent.get_or_create(&labels).get(), 0.0);
    }
}
