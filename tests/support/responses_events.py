"""The order of a Responses API event stream, as OpenAI documents it and the `openai` SDK's
stream accumulator relies on: checked event by event, for the unit and the HTTP tests."""

# per item type: the events between its output_item.added and output_item.done, in order
# (a delta may repeat)
ITEM_EVENTS = {
    "message": [
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
    ],
    "reasoning": [
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
    ],
    "function_call": [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ],
}
DELTAS = {
    "response.output_text.delta",
    "response.reasoning_text.delta",
    "response.function_call_arguments.delta",
}
TERMINAL = {"response.completed", "response.incomplete"}


def check_event_order(events: list[dict]) -> list[dict]:
    """Asserts the documented order of a finished stream's events (dicts); returns the items
    of its output_item.done events, which the terminal response's output must equal."""
    types = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events))), types
    assert types[:2] == ["response.created", "response.in_progress"], types
    assert types[-1] in TERMINAL, types
    rid = events[0]["response"]["id"]
    assert all(e["response"]["id"] == rid for e in events if "response" in e)
    assert (
        events[0]["response"]["output"] == [] and events[0]["response"]["status"] == "in_progress"
    )
    done, k = [], 2
    while types[k] == "response.output_item.added":
        item, index = events[k]["item"], events[k]["output_index"]
        assert index == len(done) and item["status"] == "in_progress", events[k]
        end = types.index("response.output_item.done", k)
        body = events[k + 1 : end]
        assert all(e["output_index"] == index and e["item_id"] == item["id"] for e in body)
        kinds = [e["type"] for e in body]
        # deltas repeat, and an empty part has none
        kinds = [t for i, t in enumerate(kinds) if not (t in DELTAS and kinds[i - 1 : i] == [t])]
        expected = ITEM_EVENTS[item["type"]]
        assert kinds in (expected, [t for t in expected if t not in DELTAS]), kinds
        text = "".join(e["delta"] for e in body if e["type"] in DELTAS)
        finished = events[end]["item"]
        assert finished["id"] == item["id"] and finished["type"] == item["type"]
        if item["type"] == "function_call":
            assert body[-1]["arguments"] == text == finished["arguments"]
        else:
            assert body[-2]["text"] == body[-1]["part"]["text"] == text
            assert [p["text"] for p in finished["content"]] == [text]
        done.append(finished)
        k = end + 1
    assert k == len(events) - 1, types[k:]
    assert events[-1]["response"]["output"] == done
    return done
