//! Cost: each request's cost from its token usage and the pool's prices, what the same usage
//! would have cost in the premium pool (the savings of routing), and monthly budgets per
//! tenant and per pool (calendar months, UTC).
//!
//! Budgets are kept per gateway replica (in memory): with several replicas each enforces its
//! own count, so a budget shared by N replicas may be overspent by up to N-1 requests' worth
//! per replica before each sees it. Sharing the spend through Redis is left for later.

use super::metrics::{BudgetLabels, CostLabels, TenantLabels, routing_metrics};
use super::plan::{Plan, Price};
use crate::providers::types::Usage;
use std::collections::HashMap;
use std::sync::Mutex;
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

/// Spending this month per tenant and per pool.
#[derive(Debug, Default)]
pub struct Ledger {
    spent: Mutex<Spent>,
}

impl Ledger {
    fn spent(&self, scope: &'static str, name: &str, month: u32) -> f64 {
        let spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        match spent.get(&(scope, name.to_owned())) {
            Some((m, usd)) if *m == month => *usd,
            _ => 0.0,
        }
    }

    /// Refuses when `name`'s budget in `budgets` is spent this month (at `unix` seconds).
    pub fn check_at(
        &self,
        scope: &'static str,
        name: &str,
        budgets: &HashMap<String, f64>,
        unix: u64,
    ) -> Result<(), OverBudget> {
        let Some(&limit) = budgets.get(name) else {
            return Ok(());
        };
        let (month, left) = month_at(unix);
        if self.spent(scope, name, month) < limit {
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

    /// [`Ledger::check_at`] now.
    pub fn check(
        &self,
        scope: &'static str,
        name: &str,
        budgets: &HashMap<String, f64>,
    ) -> Result<(), OverBudget> {
        self.check_at(scope, name, budgets, unix_now())
    }

    /// Adds `usd` to `name`'s spending this month (at `unix`), and sets its metrics when it
    /// has a budget.
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
        let labels = BudgetLabels {
            scope,
            name: name.to_owned(),
        };
        let m = routing_metrics();
        m.budget_spent.get_or_create(&labels).set(total);
        let alert = i64::from(total >= limit * alert_at);
        m.budget_alert.get_or_create(&labels).set(alert);
    }
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
/// its cost, the premium equivalent, and the tenant's and pool's monthly spending. `None`
/// when the model has no price in the configuration.
#[expect(
    clippy::too_many_arguments,
    reason = "the labels of one request; called twice"
)]
pub fn record(
    plan: &Plan,
    ledger: &Ledger,
    tenant: &str,
    pool: Option<&str>,
    provider: &str,
    model: &str,
    requested: &str,
    usage: &Usage,
) -> Option<Costed> {
    let price = plan.price(pool, provider, model)?;
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
    let now = unix_now();
    ledger.add_at(
        "tenant",
        tenant,
        usd,
        &plan.tenant_budgets,
        plan.alert_at,
        now,
    );
    if let Some(pool) = pool {
        ledger.add_at("pool", pool, usd, &plan.pool_budgets, plan.alert_at, now);
    }
    Some(Costed { usd, premium_usd })
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
        let budgets: HashMap<String, f64> = [("acme".to_owned(), 1.0)].into();
        let t = 1_796_050_800;
        assert!(ledger.check_at("tenant", "acme", &budgets, t).is_ok());
        ledger.add_at("tenant", "acme", 0.6, &budgets, 0.5, t);
        assert!(ledger.check_at("tenant", "acme", &budgets, t).is_ok());
        ledger.add_at("tenant", "acme", 0.4, &budgets, 0.5, t);
        let refused = ledger.check_at("tenant", "acme", &budgets, t).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(9 * 3600));
        assert_eq!(refused.scope, "tenant");
        // A tenant without a budget is never refused; the next month starts afresh.
        assert!(ledger.check_at("tenant", "other", &budgets, t).is_ok());
        assert!(
            ledger
                .check_at("tenant", "acme", &budgets, t + 9 * 3600)
                .is_ok()
        );
        let labels = BudgetLabels {
            scope: "tenant",
            name: "acme".into(),
        };
        assert_eq!(
            routing_metrics().budget_alert.get_or_create(&labels).get(),
            1
        );
    }
}
