"""Telegram reports: pure formatting of metrics, alignment, tuner actions and events.

Every report is text for Telegram's HTML parse mode, in Russian or English. All the words
live in ``MESSAGES`` (one table of templates per language); every value that comes from data
(run ids, details, notes, rule names) goes through ``escape``. The indicator thresholds are
read from ``services.core.indicators``, never repeated here.

Each HTML tag pair a report emits opens and closes on the same line, so ``split_message``,
which cuts only at newlines, never separates a tag from its closing tag.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from services.core.indicators import Indicator, Verdict
from services.core.schemas import (
    Ack,
    ActionRecord,
    AlignmentReport,
    AlignmentScores,
    Command,
    Event,
    Expectation,
    MetricsMessage,
    ProbeReport,
    Proposal,
    Trigger,
    probe_report,
)

Language = Literal["ru", "en"]

TELEGRAM_MESSAGE_LIMIT = 4096  # UTF-16 code units, as Telegram counts them
UTF16_UNIT_BYTES = 2

# Trends: a change within the tolerance (absolute, in the score's own units) is flat.
SCORE_TOLERANCE = 0.01  # scores in [0, 1]
QUALITY_TOLERANCE = 1.0  # quality, in percentage points
ARROW_UP, ARROW_DOWN, ARROW_FLAT = "↑", "↓", "→"
GOOD_MARK, BAD_MARK = "🟢", "🔴"
MET_MARK, UNMET_MARK, PENDING_MARK = "✅", "❌", "⏳"
CRITICAL_MARK = "🚨"
BULLET = "•"
INDENT = "  "

MAX_ACTIONS_SHOWN = 10  # the progress report lists at most the latest this many actions
MAX_PROBE_FAILURES_SHOWN = 6  # failed probes listed by name, the rest only counted
MAX_DATA_VALUE_CHARS = 200  # a nested event data value is cut to this many characters

# Indicators (by ``Indicator.name``) that need an alignment report; without one they are
# shown as pending instead of failed.

# (AlignmentScores field, higher is better, trend tolerance, is a percentage)
SCORE_ROWS: tuple[tuple[str, bool, float, bool], ...] = (
    ("diagonality", True, SCORE_TOLERANCE, False),
    ("focus", True, SCORE_TOLERANCE, False),
    ("monotonicity", True, SCORE_TOLERANCE, False),
    ("coverage", True, SCORE_TOLERANCE, False),
    ("entropy", False, SCORE_TOLERANCE, False),
    ("quality", True, QUALITY_TOLERANCE, True),
)

# Per-kind emoji of event reports (language independent).
EVENT_ICONS: dict[str, str] = {
    "run_started": "🚀", "checkpoint_saved": "💾", "restart": "🔄", "red_flag": CRITICAL_MARK,
    "recovered": MET_MARK, "indicators_met": "🏆", "paused": "⏸️", "resumed": "▶️",
    "finished": "🏁", "stopped": "⏹️", "events_dropped": "⚠️", "critical": CRITICAL_MARK,
    "approval_ignored": "🗳️", "checkpoint_failed": CRITICAL_MARK, "checkpoint_recovered": "💾",
}
PROPOSAL_MARK = "🗳️"

MESSAGES: dict[Language, dict[str, str]] = {
    "ru": {
        "progress_title": "🤖 <b>Smart Tuner V2 - Детальный отчет</b>",
        "run_step": "Запуск: <code>{run_id}</code> · шаг {step}",
        "losses_header": "📉 <b>Потери</b>",
        "losses_total": "objective: {objective} · loss: {loss}",
        "losses_parts": "mel: {mel} · postnet: {postnet} · gate: {gate} · "
                        "guided attention: {guided}",
        "grad_norm": "📊 Gradient Norm: {value} (до клиппинга; порог клиппинга {clip})",
        "lr": "⚙️ LR: {lr} · вес guided attention: {weight}",
        "non_finite": "⚠️ Нечисловые значения на шаге; пропущено шагов: {skipped}",
        "skipped": "⚠️ Пропущено шагов: {skipped}",
        "spike_guard": "🛡️ Защита от всплесков: ×{factor} медианы · не применено шагов: "
                       "{guarded}",
        "spike_guard_off": "🛡️ Защита от всплесков выключена · не применено шагов: {guarded}",
        "alignment_header": "🎯 <b>Выравнивание</b> (шаг {step})",
        "no_alignment": "🎯 Данных о выравнивании пока нет",
        "score_line": "{label}: {value} {arrow}",
        "score_diagonality": "Attention Diagonality",
        "score_focus": "Фокус",
        "score_monotonicity": "Монотонность",
        "score_coverage": "Покрытие",
        "score_entropy": "Энтропия",
        "score_quality": "Качество",
        "indicators_header": "🏁 <b>Индикаторы успеха</b>: {met}/{total}",
        "verdict_header": "🏁 <b>Индикаторы успеха</b> (шаг {step}): {met}/{total}",
        "verdict_first_met": "все выполнены впервые на шаге {step}",
        "no_verdict": "🏁 Индикаторы успеха: оценки ещё не было",
        "indicator_line": "{mark} {name}: {value} (цель {comparison} {threshold})",
        "no_data": "нет данных",
        "indicator_grad norm (pre-clip)": "Gradient norm (до клиппинга)",
        "indicator_diagonality": "Диагональность",
        "indicator_restarts": "Перезапуски",
        "indicator_loss": "Loss",
        "indicator_quality %": "Качество, %",
        "indicator_probes stop %": "Речь останавливается, % проб",
        "indicator_inference diagonality": "Диагональность при синтезе",
        "probes_header": "<b>Синтез незнакомого текста</b> (чекпойнт шага {step}):",
        "probes_summary": "останавливается {stopped} из {n} проб, медиана диагональности "
                          "{diagonality}",
        "probes_wer": "WER относительно espeak-ng: {wer}",
        "probes_failure": "{probe} ({kind}): {why}, диагональность {diagonality}",
        "probes_not_stopped": "гейт не сработал",
        "probes_bad_length": "длина ×{ratio}",
        "no_probes": "<i>Проб синтеза ещё нет (они идут на каждом чекпойнте).</i>",
        "actions_header": "🛠️ <b>Выполненные действия</b>:",
        "no_actions": "Действий не было",
        "earlier_actions": "… и ещё {count} ранее",
        "action_line": "{rule}: {metric} {value} (порог {threshold}) → {action}{change} · "
                       "{ack}{effect}",
        "action_ack": "ответ: {status}",
        "action_no_ack": "ждёт ответа",
        "action_effect": " · эффект: {metric} {before} → {after} за {steps} шагов {mark}",
        "action_title": "🛠️ <b>Действие тюнера</b> · {stage}",
        "run": "Запуск: <code>{run_id}</code>",
        "trigger": "📍 Триггер: {rule} — {metric} = {value}, порог {threshold}, "
                   "окно {window} шагов",
        "command": "⚙️ Команда: {action}{value} (источник: {source})",
        "note": "📝 {note}",
        "ack": "📨 Ответ тренера: {status} на шаге {step}{change}",
        "ack_detail": "📨 Подробности: {detail}",
        "ack_pending": "📨 Ответ тренера: ожидается",
        "effect": "📈 Эффект: {metric} {before} → {after} за {steps} шагов — {result}",
        "effect_pending": "📈 Эффект: ещё не измерен",
        "recovered_yes": "✅ восстановилось",
        "recovered_no": "❌ не восстановилось",
        "stage_issued": "команда отправлена",
        "stage_acked": "тренер ответил",
        "stage_measured": "эффект измерен",
        "stage_proposed": "ждёт решения",
        "stage_rejected": "отклонено",
        "stage_dropped": "снято без ответа",
        "proposal_title": "🗳️ <b>Тюнер предлагает изменение</b> · нужно решение админа",
        "proposal_change": "⚙️ Изменение: {action} {before} → {after}",
        "proposal_action": "⚙️ Действие: {action}",
        "proposal_expected": "🎯 Ожидаемый эффект: {metric} {before} → {direction} {target} "
                             "за {steps} шагов после применения",
        "expect_below": "ниже",
        "expect_above": "выше",
        "proposal_deadline": "⏳ Ответьте до {deadline} UTC; без ответа изменение будет "
                             "{outcome}",
        "timeout_apply": "применено",
        "timeout_drop": "отброшено",
        "resolution": "🗳️ Решение: {resolution}",
        "resolution_approved": "одобрено ({by})",
        "resolution_rejected": "отклонено ({by})",
        "resolution_timeout_applied": "ответа не было — применено",
        "resolution_timeout_dropped": "ответа не было — отброшено",
        "action_awaiting": "ждёт решения до {deadline} UTC",
        "approve": "✅ Одобрить",
        "reject": "❌ Отклонить",
        "approval_sent": "Ответ передан тюнеру.",
        "approval_unknown": "Это предложение неизвестно или устарело.",
        "approval_decided": "Уже решено: {resolution}.",
        "approval_by_approved": "✅ Одобрил {who} ({when} UTC)",
        "approval_by_rejected": "❌ Отклонил {who} ({when} UTC)",
        "status_applied": "применено",
        "status_rejected": "отклонено",
        "status_expired": "просрочено",
        "status_duplicate": "повтор",
        "event_run_started": "<b>Обучение запущено</b>",
        "event_checkpoint_saved": "<b>Чекпойнт сохранён</b>",
        "event_restart": "<b>Перезапуск обучения</b>",
        "event_red_flag": "<b>RED FLAG</b>",
        "event_recovered": "<b>Восстановление</b>",
        "event_indicators_met": "<b>Все индикаторы успеха выполнены</b>",
        "event_paused": "<b>Обучение на паузе</b>",
        "event_resumed": "<b>Обучение продолжено</b>",
        "event_finished": "<b>Обучение завершено</b>",
        "event_stopped": "<b>Обучение остановлено</b>",
        "event_events_dropped": "<b>Потеряны сообщения телеметрии</b>",
        "event_critical": "<b>Критическая ошибка</b>",
        "event_probes": "<b>Пробы синтеза</b>",
        "event_approval_ignored": "<b>Ответ на предложение не учтён</b>",
        "event_checkpoint_failed": "<b>Чекпоинт не записан</b>",
        "event_checkpoint_recovered": "<b>Чекпоинты снова записываются</b>",
        "event_step": " · шаг {step}",
        "data_line": "{key}: {value}",
        "summary_header": "🏁 <b>Индикаторы успеха</b>: {met}/{total}",
        "yes": "да",
        "no": "нет",
        "key_restarts": "Перезапусков",
        "key_consecutive": "Подряд",
        "key_dropped": "Потеряно сообщений",
        "key_dropped_total": "Потеряно всего",
        "key_stop_reason": "Причина остановки",
        "key_all_indicators_met": "Все индикаторы выполнены",
        "key_step": "Шаг",
        "key_file": "Файл",
        "key_healthy": "Исправен",
        "key_rule": "Правило",
        "key_source": "Источник",
        "key_metrics": "Метрики",
        "status_title": "📋 <b>Статус</b>",
        "status_event": "🕑 Последнее событие: {event}{step}",
        "status_restarts": "🔄 Перезапусков: {restarts}",
        "status_indicators": "🏁 Индикаторы успеха: {met}/{total}",
        "status_verdict": "🏁 Индикаторы успеха (шаг {step}): {met}/{total}",
        "status_alignment": "🎯 Диагональность: {diagonality} · качество: {quality} (шаг {step})",
        "actions_title": "🛠️ <b>Последние действия тюнера</b> · <code>{run_id}</code>",
        "help": "🤖 <b>Smart Tuner</b> — команды (необязательный последний аргумент — id "
                "запуска; без него берётся самый свежий):\n"
                "/status — коротко о запуске\n"
                "/report — подробный отчёт с картинкой выравнивания\n"
                "/alignment — картинка выравнивания\n"
                "/sample [текст] — синтез фразы последним чекпойнтом (аудио)\n"
                "/actions [N] — последние N действий тюнера\n"
                "/pause, /resume — пауза и продолжение{admin}\n"
                "/stop — остановить обучение (с подтверждением){admin}\n"
                "/lr ЗНАЧЕНИЕ — задать learning rate, напр. /lr 1e-4{admin}\n"
                "/ga ЗНАЧЕНИЕ — вес guided attention, напр. /ga 2{admin}\n"
                "/gate ЗНАЧЕНИЕ — вес стоп-кадров гейта (если речь не останавливается), "
                "напр. /gate 20{admin}\n"
                "/spikeguard ФАКТОР — не применять шаги, где норма градиента больше "
                "ФАКТОР × медиана недавних (всплески), напр. /spikeguard 10; 0 — выключить"
                "{admin}\n"
                "/skip ШАГИ — больше не обучаться на фразах из батчей, на которых шаги "
                "за последние ШАГИ шагов сломались (NaN, всплеск), напр. /skip 50{admin}\n"
                "/rollback — откат к последнему исправному чекпойнту{admin}\n"
                "/help — эта справка",
        "help_admin": " (админы)",
        "refused_chat": "🙅 Извините, этот бот отвечает только в чатах своей команды. "
                        "Попытка записана.",
        "refused_admin": "🙅 Извините, эта команда доступна только администраторам. "
                         "Попытка записана.",
        "unknown_command": "Не знаю такой команды. Список: /help",
        "no_runs": "Пока нет ни одного запуска.",
        "unknown_run": "Запуск <code>{run_id}</code> не найден.",
        "no_metrics": "У запуска <code>{run_id}</code> пока нет метрик.",
        "no_picture": "У запуска <code>{run_id}</code> пока нет картинки выравнивания.",
        "usage": "❗ Использование: {usage}",
        "usage_lr": "/lr ЗНАЧЕНИЕ [запуск], напр. /lr 1e-4",
        "usage_ga": "/ga ЗНАЧЕНИЕ [запуск], напр. /ga 2",
        "usage_gate": "/gate ЗНАЧЕНИЕ [запуск], напр. /gate 20",
        "usage_skip": "/skip ШАГИ [запуск], напр. /skip 50",
        "usage_spikeguard": "/spikeguard ФАКТОР [запуск], напр. /spikeguard 10 (0 — выключить)",
        "usage_actions": "/actions [N] [запуск], N от 1 до {max}",
        "rejected_value": "❗ Команда не отправлена: {reason}",
        "sent": "📤 {action}{value} → <code>{run_id}</code>; жду ответа тренера…",
        "no_ack": "⌛ Тренер не ответил за {seconds} с. Команда записана и будет отброшена, "
                  "если её не применят до {expires} UTC.",
        "stop_confirm": "⚠️ Остановить запуск <code>{run_id}</code>? Тренер сохранит "
                        "чекпойнт и завершится.",
        "stop_yes": "Да, остановить",
        "stop_no": "Отмена",
        "stop_cancelled": "Остановка отменена.",
        "confirm_expired": "Подтверждение устарело. Отправьте /stop ещё раз.",
        "confirm_other_user": "Подтвердить может только тот, кто отправил /stop.",
        "sample_wait": "🎙️ Синтезирую последним чекпойнтом: «{text}»",
        "sample_caption": "🎙️ <code>{run_id}</code> · шаг {step} · {stopped} · "
                          "диагональность {diagonality} · качество {quality}",
        "sample_stopped": "остановился сам",
        "sample_not_stopped": "не остановился до предела шагов",
        "no_checkpoint": "❗ Нет ни одного исправного чекпойнта в <code>{path}</code>.",
        "sample_failed": "❗ Синтез не удался: {reason}",
        "sample_too_long": "❗ Слишком длинный текст: {length} симв., можно не больше {max}.",
        "redis_down": "❗ Нет связи с Redis: {reason}",
    },
    "en": {
        "progress_title": "🤖 <b>Smart Tuner V2 - Detailed report</b>",
        "run_step": "Run: <code>{run_id}</code> · step {step}",
        "losses_header": "📉 <b>Losses</b>",
        "losses_total": "objective: {objective} · loss: {loss}",
        "losses_parts": "mel: {mel} · postnet: {postnet} · gate: {gate} · "
                        "guided attention: {guided}",
        "grad_norm": "📊 Gradient Norm: {value} (pre-clip; clip threshold {clip})",
        "lr": "⚙️ LR: {lr} · guided attention weight: {weight}",
        "non_finite": "⚠️ Non-finite values at this step; skipped steps: {skipped}",
        "skipped": "⚠️ Skipped steps: {skipped}",
        "spike_guard": "🛡️ Spike guard: ×{factor} the median · steps withheld: {guarded}",
        "spike_guard_off": "🛡️ Spike guard off · steps withheld: {guarded}",
        "alignment_header": "🎯 <b>Alignment</b> (step {step})",
        "no_alignment": "🎯 No alignment report yet",
        "score_line": "{label}: {value} {arrow}",
        "score_diagonality": "Attention Diagonality",
        "score_focus": "Focus",
        "score_monotonicity": "Monotonicity",
        "score_coverage": "Coverage",
        "score_entropy": "Entropy",
        "score_quality": "Quality",
        "indicators_header": "🏁 <b>Success indicators</b>: {met}/{total}",
        "verdict_header": "🏁 <b>Success indicators</b> (step {step}): {met}/{total}",
        "verdict_first_met": "all first met at step {step}",
        "no_verdict": "🏁 Success indicators: no evaluation yet",
        "indicator_line": "{mark} {name}: {value} (target {comparison} {threshold})",
        "no_data": "no data",
        "indicator_grad norm (pre-clip)": "Gradient norm (pre-clip)",
        "indicator_diagonality": "Diagonality",
        "indicator_restarts": "Restarts",
        "indicator_loss": "Loss",
        "indicator_quality %": "Quality, %",
        "indicator_probes stop %": "Speech stops, % of probes",
        "indicator_inference diagonality": "Inference diagonality",
        "probes_header": "<b>Unseen text, free-running</b> (checkpoint of step {step}):",
        "probes_summary": "{stopped} of {n} probes stop, median diagonality {diagonality}",
        "probes_wer": "WER relative to espeak-ng: {wer}",
        "probes_failure": "{probe} ({kind}): {why}, diagonality {diagonality}",
        "probes_not_stopped": "the gate never fired",
        "probes_bad_length": "length ×{ratio}",
        "no_probes": "<i>No inference probes yet (they run at every checkpoint).</i>",
        "actions_header": "🛠️ <b>Actions taken</b>:",
        "no_actions": "No actions taken",
        "earlier_actions": "… and {count} earlier",
        "action_line": "{rule}: {metric} {value} (threshold {threshold}) → {action}{change} · "
                       "{ack}{effect}",
        "action_ack": "ack: {status}",
        "action_no_ack": "awaiting ack",
        "action_effect": " · effect: {metric} {before} → {after} over {steps} steps {mark}",
        "action_title": "🛠️ <b>Tuner action</b> · {stage}",
        "run": "Run: <code>{run_id}</code>",
        "trigger": "📍 Trigger: {rule} — {metric} = {value}, threshold {threshold}, "
                   "window {window} steps",
        "command": "⚙️ Command: {action}{value} (source: {source})",
        "note": "📝 {note}",
        "ack": "📨 Trainer ack: {status} at step {step}{change}",
        "ack_detail": "📨 Detail: {detail}",
        "ack_pending": "📨 Trainer ack: pending",
        "effect": "📈 Effect: {metric} {before} → {after} over {steps} steps — {result}",
        "effect_pending": "📈 Effect: not measured yet",
        "recovered_yes": "✅ recovered",
        "recovered_no": "❌ not recovered",
        "stage_issued": "command issued",
        "stage_acked": "trainer answered",
        "stage_measured": "effect measured",
        "stage_proposed": "awaiting approval",
        "stage_rejected": "rejected",
        "stage_dropped": "dropped unanswered",
        "proposal_title": "🗳️ <b>The tuner proposes a change</b> · an admin's answer needed",
        "proposal_change": "⚙️ Change: {action} {before} → {after}",
        "proposal_action": "⚙️ Action: {action}",
        "proposal_expected": "🎯 Expected effect: {metric} {before} → {direction} {target} "
                             "within {steps} steps of applying it",
        "expect_below": "below",
        "expect_above": "above",
        "proposal_deadline": "⏳ Answer by {deadline} UTC; without an answer the change will "
                             "be {outcome}",
        "timeout_apply": "applied",
        "timeout_drop": "dropped",
        "resolution": "🗳️ Decision: {resolution}",
        "resolution_approved": "approved ({by})",
        "resolution_rejected": "rejected ({by})",
        "resolution_timeout_applied": "no answer in time — applied",
        "resolution_timeout_dropped": "no answer in time — dropped",
        "action_awaiting": "awaiting approval until {deadline} UTC",
        "approve": "✅ Approve",
        "reject": "❌ Reject",
        "approval_sent": "Answer passed to the tuner.",
        "approval_unknown": "This proposal is unknown or too old.",
        "approval_decided": "Already decided: {resolution}.",
        "approval_by_approved": "✅ Approved by {who} ({when} UTC)",
        "approval_by_rejected": "❌ Rejected by {who} ({when} UTC)",
        "status_applied": "applied",
        "status_rejected": "rejected",
        "status_expired": "expired",
        "status_duplicate": "duplicate",
        "event_run_started": "<b>Training started</b>",
        "event_checkpoint_saved": "<b>Checkpoint saved</b>",
        "event_restart": "<b>Training restarted</b>",
        "event_red_flag": "<b>RED FLAG</b>",
        "event_recovered": "<b>Recovered</b>",
        "event_indicators_met": "<b>All success indicators met</b>",
        "event_paused": "<b>Training paused</b>",
        "event_resumed": "<b>Training resumed</b>",
        "event_finished": "<b>Training finished</b>",
        "event_stopped": "<b>Training stopped</b>",
        "event_events_dropped": "<b>Telemetry messages lost</b>",
        "event_critical": "<b>Critical error</b>",
        "event_probes": "<b>Inference probes</b>",
        "event_approval_ignored": "<b>Answer to a proposal not counted</b>",
        "event_checkpoint_failed": "<b>Checkpoint not saved</b>",
        "event_checkpoint_recovered": "<b>Checkpoints are saved again</b>",
        "event_step": " · step {step}",
        "data_line": "{key}: {value}",
        "summary_header": "🏁 <b>Success indicators</b>: {met}/{total}",
        "yes": "yes",
        "no": "no",
        "key_restarts": "Restarts",
        "key_consecutive": "In a row",
        "key_dropped": "Messages lost",
        "key_dropped_total": "Lost in total",
        "key_stop_reason": "Stop reason",
        "key_all_indicators_met": "All indicators met",
        "key_step": "Step",
        "key_file": "File",
        "key_healthy": "Healthy",
        "key_rule": "Rule",
        "key_source": "Source",
        "key_metrics": "Metrics",
        "status_title": "📋 <b>Status</b>",
        "status_event": "🕑 Last event: {event}{step}",
        "status_restarts": "🔄 Restarts: {restarts}",
        "status_indicators": "🏁 Success indicators: {met}/{total}",
        "status_verdict": "🏁 Success indicators (step {step}): {met}/{total}",
        "status_alignment": "🎯 Diagonality: {diagonality} · quality: {quality} (step {step})",
        "actions_title": "🛠️ <b>Latest tuner actions</b> · <code>{run_id}</code>",
        "help": "🤖 <b>Smart Tuner</b> commands (an optional last argument names the run; "
                "without it, the most recent one):\n"
                "/status — the run in brief\n"
                "/report — the detailed report with the alignment picture\n"
                "/alignment — the alignment picture\n"
                "/sample [text] — speak a sentence with the latest checkpoint (audio)\n"
                "/actions [N] — the tuner's last N actions\n"
                "/pause, /resume — pause and resume training{admin}\n"
                "/stop — stop training (asks to confirm){admin}\n"
                "/lr VALUE — set the learning rate, e.g. /lr 1e-4{admin}\n"
                "/ga VALUE — set the guided attention weight, e.g. /ga 2{admin}\n"
                "/gate VALUE — the gate's stop-frame weight (when speech never stops), "
                "e.g. /gate 20{admin}\n"
                "/spikeguard FACTOR — withhold steps whose grad norm exceeds FACTOR x the "
                "recent median (spikes), e.g. /spikeguard 10; 0 switches it off{admin}\n"
                "/skip STEPS — stop training on the utterances of the batches whose steps "
                "failed (NaN, spike) in the last STEPS steps, e.g. /skip 50{admin}\n"
                "/rollback — roll back to the last healthy checkpoint{admin}\n"
                "/help — this help",
        "help_admin": " (admins)",
        "refused_chat": "🙅 Sorry, this bot only answers its team's chats. The attempt has "
                        "been logged.",
        "refused_admin": "🙅 Sorry, only admins may use this command. The attempt has been "
                         "logged.",
        "unknown_command": "I don't know that command. See /help",
        "no_runs": "There are no runs yet.",
        "unknown_run": "No run <code>{run_id}</code>.",
        "no_metrics": "Run <code>{run_id}</code> has no metrics yet.",
        "no_picture": "Run <code>{run_id}</code> has no alignment picture yet.",
        "usage": "❗ Usage: {usage}",
        "usage_lr": "/lr VALUE [run], e.g. /lr 1e-4",
        "usage_ga": "/ga VALUE [run], e.g. /ga 2",
        "usage_gate": "/gate VALUE [run], e.g. /gate 20",
        "usage_skip": "/skip STEPS [run], e.g. /skip 50",
        "usage_spikeguard": "/spikeguard FACTOR [run], e.g. /spikeguard 10 (0 switches it off)",
        "usage_actions": "/actions [N] [run], N from 1 to {max}",
        "rejected_value": "❗ Not sent: {reason}",
        "sent": "📤 {action}{value} → <code>{run_id}</code>; waiting for the trainer's ack…",
        "no_ack": "⌛ No ack from the trainer within {seconds} s. The command is written and "
                  "will be dropped if not applied by {expires} UTC.",
        "stop_confirm": "⚠️ Stop run <code>{run_id}</code>? The trainer saves a checkpoint "
                        "and exits.",
        "stop_yes": "Yes, stop it",
        "stop_no": "Cancel",
        "stop_cancelled": "Stop cancelled.",
        "confirm_expired": "This confirmation has expired. Send /stop again.",
        "confirm_other_user": "Only the person who sent /stop may confirm it.",
        "sample_wait": "🎙️ Speaking with the latest checkpoint: “{text}”",
        "sample_caption": "🎙️ <code>{run_id}</code> · step {step} · {stopped} · "
                          "diagonality {diagonality} · quality {quality}",
        "sample_stopped": "stopped on its own",
        "sample_not_stopped": "did not stop before the step limit",
        "no_checkpoint": "❗ No healthy checkpoint in <code>{path}</code>.",
        "sample_failed": "❗ Synthesis failed: {reason}",
        "sample_too_long": "❗ Text too long: {length} characters, at most {max}.",
        "redis_down": "❗ Redis unreachable: {reason}",
    },
}

# A tag of Telegram's HTML subset; a bare "<" never occurs in our text (data is escaped).
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9-]*(?:\s[^<>]*)?/?>")


# ---------------------------------------------------------------------------- formatting


def to_plain_text(text: str) -> str:
    """``text`` in HTML parse mode as plain text: tags stripped, entities unescaped."""
    return html.unescape(_TAG.sub("", text))


def escape(text: object) -> str:
    """``text`` made safe for Telegram's HTML parse mode: ``&``, ``<`` and ``>`` escaped."""
    return html.escape(str(text), quote=False)


def _non_finite(value: float) -> str | None:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return None


def format_number(value: float) -> str:
    """Four significant digits (losses, norms, thresholds); NaN as ``NaN``, infinities ``Inf``."""
    return _non_finite(value) or f"{value:.4g}"


def format_lr(value: float) -> str:
    """A learning rate in scientific notation, e.g. ``1.0e-03``."""
    return _non_finite(value) or f"{value:.1e}"


def format_score(value: float) -> str:
    """An alignment score in [0, 1] with three decimals, e.g. ``0.712``."""
    return _non_finite(value) or f"{value:.3f}"


def format_percent(value: float) -> str:
    """A percentage with one decimal, e.g. ``85.0%``."""
    return _non_finite(value) or f"{value:.1f}%"


def format_command_value(action: str, value: float | None) -> str:
    """A command's value as its knob is usually written (LR in scientific notation)."""
    if value is None:
        return "?"
    return format_lr(value) if action == "set_lr" else format_number(value)


def trend_arrow(previous: float | None, current: float, higher_is_better: bool,
                tolerance: float) -> str:
    """The trend from ``previous`` to ``current``: an arrow and, for a change, a verdict.

    ``"→"`` when the change is within ``tolerance`` (absolute); otherwise ``"↑"`` or ``"↓"``
    followed by ``🟢`` when the move is good (up for a higher-is-better score, down for a
    lower-is-better one) and ``🔴`` when bad. ``""`` when there is no trend to show: no
    previous value, or either value is not finite.
    """
    if previous is None or not (math.isfinite(previous) and math.isfinite(current)):
        return ""
    delta = current - previous
    if abs(delta) <= tolerance:
        return ARROW_FLAT
    rising = delta > 0
    good = rising == higher_is_better
    return (ARROW_UP if rising else ARROW_DOWN) + (GOOD_MARK if good else BAD_MARK)


def _line(text: str, depth: int = 0) -> str:
    return (INDENT * depth + text).rstrip()


# ---------------------------------------------------------------------------- progress


def _score_lines(words: Mapping[str, str], scores: AlignmentScores,
                 previous: AlignmentScores | None) -> list[str]:
    lines = []
    for field, higher_is_better, tolerance, percent in SCORE_ROWS:
        current = float(getattr(scores, field))
        before = None if previous is None else float(getattr(previous, field))
        value = format_percent(current) if percent else format_score(current)
        arrow = trend_arrow(before, current, higher_is_better, tolerance)
        lines.append(_line(words["score_line"].format(
            label=words[f"score_{field}"], value=value, arrow=arrow), 1))
    return lines


def _indicator_name(words: Mapping[str, str], name: str) -> str:
    return words.get(f"indicator_{name}", escape(name))


def _indicator_lines(words: Mapping[str, str], checks: Sequence[Indicator],
                     header: str | None = None) -> list[str]:
    """The ✅/❌ list: one line per indicator with its value, target and how it was
    measured; a value not measured yet (NaN: no probe pass so far) is pending."""
    pending = {check.name for check in checks if math.isnan(check.value)}
    met = sum(check.met for check in checks)
    lines = [header or words["indicators_header"].format(met=met, total=len(checks))]
    for check in checks:
        waiting = check.name in pending
        mark = PENDING_MARK if waiting else (MET_MARK if check.met else UNMET_MARK)
        value = words["no_data"] if waiting else format_number(check.value)
        line = words["indicator_line"].format(
            mark=mark, name=_indicator_name(words, check.name), value=value,
            comparison=escape(check.comparison), threshold=f"{check.threshold:g}")
        if check.measured:
            line += f" — <i>{escape(check.measured)}</i>"
        lines.append(_line(line, 1))
    return lines


def _verdict_lines(words: Mapping[str, str], verdict: Verdict | None) -> list[str]:
    """The trainer's verdict as the report shows it (it is never recomputed here)."""
    if verdict is None:
        return [words["no_verdict"]]
    header = words["verdict_header"].format(step=verdict.step, met=verdict.met_count,
                                            total=len(verdict.indicators))
    lines = _indicator_lines(words, verdict.indicators, header)
    if verdict.first_met_step is not None:
        lines.append(_line(words["verdict_first_met"].format(step=verdict.first_met_step), 1))
    return lines


def _action_line(words: Mapping[str, str], record: ActionRecord) -> str:
    trigger, command, ack, effect = record.trigger, record.command, record.ack, record.effect
    if ack is not None and (ack.before is not None or ack.after is not None):
        change = (f" {format_command_value(command.action, ack.before)} → "
                  f"{format_command_value(command.action, ack.after)}")
    elif command.value is not None:
        change = f" → {format_command_value(command.action, command.value)}"
    else:
        change = ""
    ack_text = (words["action_ack"].format(status=words[f"status_{ack.status}"])
                if ack is not None else words["action_no_ack"])
    if record.stage == "proposed" and record.proposal is not None:
        ack_text = words["action_awaiting"].format(
            deadline=format_clock(record.proposal.deadline))
    elif record.stage in ("rejected", "dropped"):
        ack_text = resolution_text(words, record)
    elif record.resolution is not None:
        ack_text = f"{resolution_text(words, record)} · {ack_text}"
    effect_text = "" if effect is None else words["action_effect"].format(
        metric=escape(effect.metric), before=format_number(effect.before),
        after=format_number(effect.after), steps=effect.steps,
        mark=MET_MARK if effect.recovered else UNMET_MARK)
    return _line(f"{BULLET} " + words["action_line"].format(
        rule=escape(trigger.rule), metric=escape(trigger.metric),
        value=format_number(trigger.value), threshold=format_number(trigger.threshold),
        action=escape(command.action), change=change, ack=ack_text, effect=effect_text), 1)


def _probe_lines(words: Mapping[str, str], probes: ProbeReport | None) -> list[str]:
    """The inference probes in brief: how many stop, and why the others failed."""
    if probes is None:
        return [words["no_probes"]]
    lines = [words["probes_header"].format(step=probes.checkpoint_step),
             _line(words["probes_summary"].format(
                 stopped=probes.n - len(probes.failures), n=probes.n,
                 diagonality=format_score(probes.median_diagonality)), 1)]
    if probes.relative_wer is not None:
        lines.append(_line(words["probes_wer"].format(
            wer=f"{probes.relative_wer:+.2f}"), 1))
    return lines + _probe_failure_lines(words, probes)


def _probe_failure_lines(words: Mapping[str, str], probes: ProbeReport) -> list[str]:
    lines = []
    for failure in probes.failures[:MAX_PROBE_FAILURES_SHOWN]:
        why = (words["probes_not_stopped"] if not failure.stopped
               else words["probes_bad_length"].format(ratio=format_number(failure.length_ratio)))
        lines.append(_line(f"{BULLET} " + words["probes_failure"].format(
            probe=escape(failure.probe_id), kind=escape(failure.kind), why=why,
            diagonality=format_score(failure.diagonality)), 1))
    return lines


def progress_report(run_id: str, metrics: MetricsMessage, report: AlignmentReport | None,
                    previous_report: AlignmentReport | None, actions: Sequence[ActionRecord],
                    verdict: Verdict | None, language: Language,
                    probes: ProbeReport | None = None) -> str:
    """The periodic progress report.

    Step, losses, pre-clip grad norm, LR, guided attention weight and clip threshold from
    ``metrics``; the alignment scores of ``report`` with trend arrows against
    ``previous_report``; the trainer's ``verdict`` on the success indicators, as it was
    published (each with how it was measured); and one line per action in ``actions`` (the
    latest ``MAX_ACTIONS_SHOWN``), or an explicit "no actions" line.
    """
    words = MESSAGES[language]
    lines = [
        words["progress_title"],
        words["run_step"].format(run_id=escape(run_id), step=metrics.step),
        "",
        words["losses_header"],
        _line(words["losses_total"].format(objective=format_number(metrics.objective),
                                           loss=format_number(metrics.loss)), 1),
        _line(words["losses_parts"].format(
            mel=format_number(metrics.mel), postnet=format_number(metrics.mel_postnet),
            gate=format_number(metrics.gate), guided=format_number(metrics.guided_attention)),
            1),
        words["grad_norm"].format(value=format_number(metrics.grad_norm),
                                  clip=format_number(metrics.clip_threshold)),
        words["lr"].format(lr=format_lr(metrics.lr),
                           weight=format_number(metrics.guided_attention_weight)),
    ]
    if not metrics.finite:
        lines.append(words["non_finite"].format(skipped=metrics.skipped_steps))
    elif metrics.skipped_steps:
        lines.append(words["skipped"].format(skipped=metrics.skipped_steps))
    lines.extend(_spike_guard_lines(words, metrics))
    lines.append("")
    if report is None:
        lines.append(words["no_alignment"])
    else:
        lines.append(words["alignment_header"].format(step=report.step))
        previous = None if previous_report is None else previous_report.scores
        lines.extend(_score_lines(words, report.scores, previous))
    lines.append("")
    lines.extend(_probe_lines(words, probes))
    lines.append("")
    lines.extend(_verdict_lines(words, verdict))
    lines.append("")
    lines.append(words["actions_header"])
    if not actions:
        lines.append(_line(words["no_actions"], 1))
    else:
        hidden = max(0, len(actions) - MAX_ACTIONS_SHOWN)
        if hidden:
            lines.append(_line(words["earlier_actions"].format(count=hidden), 1))
        lines.extend(_action_line(words, record) for record in actions[hidden:])
    return "\n".join(lines)


def _spike_guard_lines(words: Mapping[str, str], metrics: MetricsMessage) -> list[str]:
    """The spike guard's line: when it is on or has withheld steps (none from a trainer
    that does not report it, nor while it was never used)."""
    factor, guarded = metrics.spike_guard, metrics.guarded_steps or 0
    if factor is None or (not factor and not guarded):
        return []
    if not factor:
        return [words["spike_guard_off"].format(guarded=guarded)]
    return [words["spike_guard"].format(factor=format_number(factor), guarded=guarded)]


def status_report(run_id: str, metrics: MetricsMessage | None, report: AlignmentReport | None,
                  last_event: Event | None, restarts: int, language: Language,
                  verdict: Verdict | None = None) -> str:
    """The run in brief (``/status``): step, loss, grad norm, LR, alignment, how many of the
    trainer's verdict's indicators are met, restarts and the last event."""
    words = MESSAGES[language]
    lines = [words["status_title"]]
    if metrics is None:
        lines.append(words["no_metrics"].format(run_id=escape(run_id)))
    else:
        lines.append(words["run_step"].format(run_id=escape(run_id), step=metrics.step))
        lines.append(words["losses_total"].format(objective=format_number(metrics.objective),
                                                  loss=format_number(metrics.loss)))
        lines.append(words["grad_norm"].format(value=format_number(metrics.grad_norm),
                                               clip=format_number(metrics.clip_threshold)))
        lines.append(words["lr"].format(lr=format_lr(metrics.lr),
                                        weight=format_number(metrics.guided_attention_weight)))
    if report is None:
        lines.append(words["no_alignment"])
    else:
        lines.append(words["status_alignment"].format(
            diagonality=format_score(report.scores.diagonality),
            quality=format_percent(report.scores.quality), step=report.step))
    if verdict is None:
        lines.append(words["no_verdict"])
    else:
        lines.append(words["status_verdict"].format(step=verdict.step, met=verdict.met_count,
                                                    total=len(verdict.indicators)))
    lines.append(words["status_restarts"].format(restarts=restarts))
    if last_event is not None:
        step = "" if last_event.step is None else words["event_step"].format(
            step=last_event.step)
        title = to_plain_text(words[f"event_{last_event.event}"])
        lines.append(words["status_event"].format(event=title, step=step))
    return "\n".join(lines)


def actions_report(run_id: str, records: Sequence[ActionRecord], language: Language) -> str:
    """The tuner's latest decisions (``/actions``), one line each, oldest first."""
    words = MESSAGES[language]
    lines = [words["actions_title"].format(run_id=escape(run_id))]
    if not records:
        lines.append(_line(words["no_actions"], 1))
    lines.extend(_action_line(words, record) for record in records)
    return "\n".join(lines)


def help_text(language: Language, admins_only: bool) -> str:
    """The ``/help`` text; mutating commands are marked when only admins may use them."""
    words = MESSAGES[language]
    return words["help"].format(admin=words["help_admin"] if admins_only else "")


# ---------------------------------------------------------------------------- actions


def _trigger_line(words: Mapping[str, str], trigger: Trigger) -> str:
    return words["trigger"].format(
        rule=escape(trigger.rule), metric=escape(trigger.metric),
        value=format_number(trigger.value), threshold=format_number(trigger.threshold),
        window=trigger.window)


def _ack_lines(words: Mapping[str, str], command: Command, ack: Ack) -> list[str]:
    change = ""
    if ack.before is not None or ack.after is not None:
        change = (f", {format_command_value(command.action, ack.before)} → "
                  f"{format_command_value(command.action, ack.after)}")
    lines = [words["ack"].format(status=words[f"status_{ack.status}"], step=ack.step,
                                 change=change)]
    if ack.detail:
        lines.append(words["ack_detail"].format(detail=escape(ack.detail)))
    return lines


def format_clock(ts: float) -> str:
    """A unix time as the UTC time of day, e.g. ``14:05:09``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def resolution_text(words: Mapping[str, str], record: ActionRecord) -> str:
    """How a proposal ended, in words ("approved (telegram:1@1)"); "" if it was none."""
    if record.resolution is None:
        return ""
    return words[f"resolution_{record.resolution}"].format(by=escape(record.decided_by))


def _expected_line(words: Mapping[str, str], expected: Expectation) -> str:
    return words["proposal_expected"].format(
        metric=escape(expected.metric), before=format_number(expected.before),
        direction=words[f"expect_{expected.recovered_when}"],
        target=format_number(expected.target), steps=expected.within_steps)


def proposal_report(record: ActionRecord, language: Language) -> str:
    """A supervised proposal put to people: the trigger, the change (before → after), the
    effect it should have, and until when an answer is awaited (and what silence does)."""
    words = MESSAGES[language]
    command = record.command
    proposal = record.proposal or Proposal(deadline=command.expires_at or record.ts,
                                           on_timeout="apply")
    lines = [words["proposal_title"], words["run"].format(run_id=escape(record.run_id)),
             _trigger_line(words, record.trigger)]
    if command.value is None:
        lines.append(words["proposal_action"].format(action=escape(command.action)))
    else:
        lines.append(words["proposal_change"].format(
            action=escape(command.action),
            before=format_command_value(command.action, proposal.current),
            after=format_command_value(command.action, command.value)))
    if command.note:
        lines.append(words["note"].format(note=escape(command.note)))
    if proposal.expected is not None:
        lines.append(_expected_line(words, proposal.expected))
    lines.append(words["proposal_deadline"].format(
        deadline=format_clock(proposal.deadline),
        outcome=words[f"timeout_{proposal.on_timeout}"]))
    return "\n".join(lines)


def ack_report(command: Command, ack: Ack, language: Language) -> str:
    """The trainer's answer to a person's command: status, step, before → after, detail."""
    return "\n".join(_ack_lines(MESSAGES[language], command, ack))


def action_report(record: ActionRecord, language: Language) -> str:
    """One tuner decision at its current stage (issued, acked or measured; proposed, rejected
    or dropped under supervision).

    The trigger (rule, metric, value, threshold, window), the command (action, value,
    source, note), the trainer's ack (status, step, before → after, detail) and the measured
    effect (metric before → after over N steps, recovered or not); an ack or effect not in
    yet is shown as pending. A proposal is ``proposal_report``; a supervised action says how
    its proposal was decided, and a rejected or dropped one ends there.
    """
    if record.stage == "proposed":
        return proposal_report(record, language)
    words = MESSAGES[language]
    command, ack, effect = record.command, record.ack, record.effect
    value = ("" if command.value is None
             else f" {format_command_value(command.action, command.value)}")
    lines = [
        words["action_title"].format(stage=words[f"stage_{record.stage}"]),
        words["run"].format(run_id=escape(record.run_id)),
        _trigger_line(words, record.trigger),
        words["command"].format(action=escape(command.action), value=value,
                                source=escape(command.source)),
    ]
    if command.note:
        lines.append(words["note"].format(note=escape(command.note)))
    if record.resolution is not None:
        lines.append(words["resolution"].format(resolution=resolution_text(words, record)))
    if record.stage in ("rejected", "dropped"):
        return "\n".join(lines)  # nothing was sent: no ack or effect will come
    if ack is None:
        lines.append(words["ack_pending"])
    else:
        lines.extend(_ack_lines(words, command, ack))
    if effect is None:
        lines.append(words["effect_pending"])
    else:
        lines.append(words["effect"].format(
            metric=escape(effect.metric), before=format_number(effect.before),
            after=format_number(effect.after), steps=effect.steps,
            result=words["recovered_yes" if effect.recovered else "recovered_no"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- events


def _data_value(words: Mapping[str, str], value: Any) -> str:
    if isinstance(value, bool):
        return words["yes" if value else "no"]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, default=str, sort_keys=True)
    if len(text) > MAX_DATA_VALUE_CHARS:
        text = text[:MAX_DATA_VALUE_CHARS - 1] + "…"
    return escape(text)


def _parse_indicators(raw: Any) -> list[Indicator] | None:
    if not isinstance(raw, list):
        return None
    try:
        return [Indicator.model_validate(item) for item in raw]
    except ValidationError:
        return None


def _parse_trigger(raw: Any) -> Trigger | None:
    try:
        return Trigger.model_validate(raw)
    except ValidationError:
        return None


def event_report(event: Event, language: Language) -> str:
    """A lifecycle or health event: its title, run and step, detail and key data.

    Critical events (and every red flag) carry ``🚨``; recoveries ``✅``. A trigger in the
    data (the tuner's red flags and recoveries) is shown as the trigger line; indicators (a
    finished or stopped run's summary) as the ✅/❌ list; every other data item as one
    ``key: value`` line.
    """
    words = MESSAGES[language]
    icon = EVENT_ICONS.get(event.event, "")
    if event.severity == "critical" and icon != CRITICAL_MARK:
        icon = f"{CRITICAL_MARK} {icon}".strip()
    step = "" if event.step is None else words["event_step"].format(step=event.step)
    lines = [f"{icon} {words[f'event_{event.event}']}".strip(),
             words["run"].format(run_id=escape(event.run_id)) + step]
    if event.detail:
        lines.append(escape(event.detail))
    data = dict(event.data)
    trigger = _parse_trigger(data.get("trigger"))
    if trigger is not None:
        del data["trigger"]
        lines.append(_trigger_line(words, trigger))
    probes = probe_report(event)
    if probes is not None:  # its detail line says it all; the failures are the news
        return "\n".join(lines + _probe_failure_lines(words, probes))
    checks = _parse_indicators(data.get("indicators"))
    if checks is not None:
        del data["indicators"]
        lines.extend(_indicator_lines(words, checks))
    for key in sorted(data, key=str):
        label = words.get(f"key_{key}", escape(key))
        lines.append(words["data_line"].format(key=label, value=_data_value(words, data[key])))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- splitting


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units, as Telegram counts its message limit."""
    return len(text.encode("utf-16-le")) // UTF16_UNIT_BYTES


def _hard_split(line: str, limit: int) -> list[str]:
    """An overlong line as plain text (tags stripped), cut so each escaped piece fits."""
    plain = to_plain_text(line)
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for char in plain:
        cost = utf16_length(escape(char))
        if current and size + cost > limit:
            pieces.append(escape("".join(current)))
            current, size = [], 0
        current.append(char)
        size += cost
    if current:
        pieces.append(escape("".join(current)))
    return pieces


def split_message(text: str, limit: int = TELEGRAM_MESSAGE_LIMIT) -> list[str]:
    """``text`` cut into Telegram messages of at most ``limit`` UTF-16 code units each.

    Cuts only at newlines (the newline at a cut is dropped), so a tag pair kept on one line
    is never separated. A single line longer than ``limit`` is sent as plain text: its tags
    are stripped and it is cut anywhere (never inside a character or an HTML entity).
    Chunks that would be blank are dropped, so every chunk has visible text; blank text
    gives no chunks. ``limit`` must leave room for an escaped character (at least 5).
    """
    if limit < len("&amp;"):
        raise ValueError(f"limit {limit} is too small for an escaped character")
    chunks: list[str] = []
    current: str | None = None
    size = 0
    for line in text.split("\n"):
        length = utf16_length(line)
        if length > limit:
            if current is not None:
                chunks.append(current)
                current = None
            chunks.extend(_hard_split(line, limit))
        elif current is None:
            current, size = line, length
        elif size + 1 + length <= limit:
            current, size = f"{current}\n{line}", size + 1 + length
        else:
            chunks.append(current)
            current, size = line, length
    if current is not None:
        chunks.append(current)
    return [chunk for chunk in chunks if chunk.strip()]
