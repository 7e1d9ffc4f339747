import { createRoot } from "react-dom/client";
import { Kck } from "@kck/client";
import { KckProvider, useKck } from "@kck/client/react";

function User({ id }) {
  const { value, loading, error, stale } = useKck(`user/${id}`);
  if (loading) return <p id="loading">Loading…</p>;
  if (!value) return <p id="error">{error?.message}</p>;
  return (
    <p id="user" className={stale ? "stale" : ""} data-stale={String(stale)}>
      User {value.id}: <b id="name">{value.name}</b>
    </p>
  );
}

const params = new URLSearchParams(location.search);
const kck = new Kck({ baseUrl: params.get("kck") ?? "", token: params.get("token") ?? undefined });
createRoot(document.getElementById("root")).render(
  <KckProvider client={kck}>
    <User id={params.get("id") ?? "1"} />
  </KckProvider>,
);
